"""Recent latency for the load report: a moving average of what a histogram observed lately.

The worker's metrics are cumulative histograms; the router's min_latency policy wants what
the worker sees now (`WorkerLoad.recent_ttft_ms`). `RecentMean` reads the histogram's `_sum`
and `_count` from the worker's registry at each load report, averages the observations made
since the previous report, and folds that into an exponential moving average (weight
`weight` for the newest interval). With no new observation the average stays as it was; 0
means no sample yet.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry


class RecentMean:
    """Moving average, in milliseconds, of a histogram's observations between reports."""

    def __init__(self, registry: CollectorRegistry, name: str, labels: dict[str, str], weight: float = 0.3) -> None:
        self.registry, self.name, self.labels, self.weight = registry, name, labels, weight
        self._sum = self._count = 0.0
        self.value_ms = 0.0

    def update(self) -> float:
        """Fold in what was observed since the last call; returns the average (ms)."""
        total = self.registry.get_sample_value(self.name + "_sum", self.labels) or 0.0
        count = self.registry.get_sample_value(self.name + "_count", self.labels) or 0.0
        if count > self._count:
            recent = (total - self._sum) / (count - self._count) * 1000
            self.value_ms = recent if not self.value_ms else (1 - self.weight) * self.value_ms + self.weight * recent
        self._sum, self._count = total, count
        return self.value_ms
