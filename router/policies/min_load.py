"""min_load: the least loaded worker. The default for decode.

Algorithm: pick the worker with the lowest ``WorkerView.load`` (running + queued tokens
reported by the worker, 64 per request the router has in flight there, 1000 per unit of
KV usage; see ``router/types.py``); ties go to the smaller address, so the answer is
deterministic. Because ``in_flight`` counts the router's own dispatches before the next
load report arrives, a burst of requests spreads across equal workers instead of piling
onto the one that looked idlest at the last report.

Parameters: none. State: none.
"""
from __future__ import annotations

from typing import Sequence

from baton.router.policies.base import Policy, least_loaded, register_policy
from baton.router.types import WorkerView


@register_policy
class MinLoadPolicy(Policy):
    """The worker with the lowest load, ties by address."""

    name = "min_load"

    def select(self, workers: list[WorkerView], prompt_token_ids: Sequence[int]) -> WorkerView:
        return least_loaded(workers)
