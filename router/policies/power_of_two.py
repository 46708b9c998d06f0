"""power_of_two: the power of two random choices.

Algorithm: with one worker, take it. Otherwise sample two distinct workers uniformly at
random (from the candidates ordered by address, so a seed gives the same draws whatever
order the caller lists them in) and take the one with the lower ``WorkerView.load``; on a
tie take the first one drawn, so equally loaded workers share the traffic evenly. This
avoids the herding of a pure min-load choice on stale load reports while staying close to
it in balance (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing").

Parameters:
- ``seed`` (int or None, default None): seed of the policy's own ``random.Random``; None
  seeds from the OS. Tests and reproducible benchmarks pass an int.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

from baton.router.policies.base import Policy, register_policy, require_workers
from baton.router.types import WorkerView


@register_policy
class PowerOfTwoPolicy(Policy):
    """The lower-loaded of two random workers."""

    name = "power_of_two"

    def __init__(self, seed: Optional[int] = None) -> None:
        self._seed = seed
        self._rng = random.Random(seed)

    def select(self, workers: list[WorkerView], prompt_token_ids: Sequence[int]) -> WorkerView:
        require_workers(workers)
        if len(workers) == 1:
            return workers[0]
        ordered = sorted(workers, key=lambda w: w.address)
        first, second = self._rng.sample(ordered, 2)
        return second if second.load < first.load else first

    def __repr__(self) -> str:
        return f"PowerOfTwoPolicy(seed={self._seed!r})"
