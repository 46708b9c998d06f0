"""min_latency: the worker expected to answer soonest, from the latencies workers report.

Each worker reports its recent time to first token and inter-token latency (moving
averages, ``WorkerLoad.recent_ttft_ms`` / ``recent_itl_ms``; ``WorkerView``). Reports are
up to one health interval old, so the router scales them by the work it has sent since:

    expected_ms = (recent_ttft_ms + recent_itl_ms) * (1 + in_flight) / (1 + running_requests)

``in_flight`` (what the router has there now) against ``running_requests`` (what the worker
ran when it measured) makes a worker the router just loaded look slower at once, so a burst
does not herd onto the one that looked fastest at the last report. A worker with no sample
yet (both 0) is scored with the lowest expected latency among those that have one, so new
workers get traffic and learn; with no sample anywhere the policy is min_load. Ties go to
the lower ``load``, then the smaller address.

Parameters: none. State: none.
"""
from __future__ import annotations

from typing import Sequence

from baton.router.policies.base import Policy, least_loaded, register_policy, require_workers
from baton.router.types import WorkerView


def expected_ms(worker: WorkerView) -> float:
    """The module's latency estimate for one more request on `worker` (0 without a sample)."""
    base = worker.recent_ttft_ms + worker.recent_itl_ms
    return base * (1 + worker.in_flight) / (1 + worker.running_requests)


@register_policy
class MinLatencyPolicy(Policy):
    """Lowest expected latency from the workers' own recent TTFT / ITL."""

    name = "min_latency"

    def select(self, workers: list[WorkerView], prompt_token_ids: Sequence[int]) -> WorkerView:
        require_workers(workers)
        scores = {w.address: expected_ms(w) for w in workers}
        known = [s for w, s in zip(workers, scores.values()) if w.recent_ttft_ms or w.recent_itl_ms]
        if not known:
            return least_loaded(workers)
        floor = min(known)
        for w in workers:
            if not (w.recent_ttft_ms or w.recent_itl_ms):
                scores[w.address] = floor
        return min(workers, key=lambda w: (scores[w.address], w.load, w.address))
