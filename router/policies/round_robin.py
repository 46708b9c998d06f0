"""round_robin: take the workers in turn, ignoring load and prompt.

Algorithm: order the candidate workers by address and pick the first whose address comes
after the one picked last time, wrapping around to the smallest. Remembering the last
address rather than a counter keeps the rotation fair when the candidate set changes
between calls (a worker excluded by a retry, added or removed does not make the others
skip or repeat a turn).

Parameters: none. State: the last address picked. ``select`` advances the rotation (a
selected-but-not-dispatched request still uses its turn, as in SGLang's router).
"""
from __future__ import annotations

from typing import Optional, Sequence

from baton.router.policies.base import Policy, register_policy, require_workers
from baton.router.types import WorkerView


@register_policy
class RoundRobinPolicy(Policy):
    """Cycles over the workers in address order."""

    name = "round_robin"

    def __init__(self) -> None:
        self._last: Optional[str] = None

    def select(self, workers: list[WorkerView], prompt_token_ids: Sequence[int]) -> WorkerView:
        require_workers(workers)
        ordered = sorted(workers, key=lambda w: w.address)
        chosen = ordered[0]
        if self._last is not None:
            chosen = next((w for w in ordered if w.address > self._last), ordered[0])
        self._last = chosen.address
        return chosen
