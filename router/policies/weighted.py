"""weighted: least load per unit of weight, for workers of unequal speed (mixed GPU types).

Each worker has a weight (``weights``: ``host:port=weight`` pairs, comma-separated, e.g. an
H200 worker at 2 and an A10 worker at 1; unlisted workers weigh ``default_weight``). The
policy picks the lowest ``(load + 64) / weight`` (``WorkerView.load``: queued and running
tokens, 64 per request in flight; the 64 makes idle workers differ by weight too), ties by
address. As each dispatch adds 64 to the chosen worker's load, equal-load workers receive
requests in proportion to their weights.

Parameters:
- ``weights`` (str, default ""): ``host:port=weight`` pairs; a weight must be > 0.
- ``default_weight`` (float > 0, default 1.0): the weight of workers not listed.
"""
from __future__ import annotations

from typing import Sequence

from baton.router.policies.base import Policy, register_policy, require_workers
from baton.router.types import WorkerView


def parse_weights(text: str) -> dict[str, float]:
    """``host:port=weight,...`` as a dict; ValueError naming the bad pair."""
    weights: dict[str, float] = {}
    for pair in (p.strip() for p in text.split(",") if p.strip()):
        address, sep, value = pair.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not address or weight <= 0:
            raise ValueError(f"worker weight {pair!r}: expected host:port=weight with weight > 0")
        weights[address] = weight
    return weights


@register_policy
class WeightedPolicy(Policy):
    """Least (load + 64) / weight."""

    name = "weighted"

    def __init__(self, weights: str = "", default_weight: float = 1.0) -> None:
        if default_weight <= 0:
            raise ValueError(f"default_weight must be > 0, got {default_weight}")
        self.weights = parse_weights(weights)
        self.default_weight = default_weight

    def weight(self, address: str) -> float:
        """The weight of a worker."""
        return self.weights.get(address, self.default_weight)

    def select(self, workers: list[WorkerView], prompt_token_ids: Sequence[int]) -> WorkerView:
        require_workers(workers)
        return min(workers, key=lambda w: ((w.load + 64) / self.weight(w.address), w.address))

    def __repr__(self) -> str:
        return f"WeightedPolicy(weights={self.weights!r}, default_weight={self.default_weight})"
