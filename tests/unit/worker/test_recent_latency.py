"""The load report's recent TTFT: a moving average of the histogram's observations between reports."""
import pytest
from prometheus_client import CollectorRegistry, Histogram

from baton.services.worker.recent_latency import RecentMean


def test_recent_mean_follows_the_latest_observations():
    registry = CollectorRegistry()
    ttft = Histogram("ttft_seconds", "t", ["role"], registry=registry).labels(role="decode")
    recent = RecentMean(registry, "ttft_seconds", {"role": "decode"}, weight=0.5)
    assert recent.update() == 0.0                  # no sample yet
    ttft.observe(0.1)
    ttft.observe(0.3)
    assert recent.update() == pytest.approx(200)   # the first interval's mean, in ms
    assert recent.update() == pytest.approx(200)   # nothing new: unchanged
    ttft.observe(1.0)
    assert recent.update() == pytest.approx(600)   # half old, half the newest interval
