"""What the router's per-request path caches stays correct: worker views, stubs, metric children."""
from __future__ import annotations

import asyncio

import grpc
from prometheus_client import CollectorRegistry, Counter

from baton.protos.baton.v1 import worker_pb2
from baton.router.breaker import CircuitBreaker
from baton.router.metrics import labelled
from baton.router.registry import WorkerEntry
from baton.router.types import Role


def test_a_worker_view_is_reused_until_its_load_health_or_in_flight_changes() -> None:
    async def scenario() -> None:
        channel = grpc.aio.insecure_channel("127.0.0.1:1")
        entry = WorkerEntry("127.0.0.1:1", Role.DECODE, CircuitBreaker(3, 1.0), channel, healthy=True)
        first = entry.view()
        assert entry.view() is first and entry.decode_stub() is entry.decode_stub()
        entry.in_flight += 1
        assert entry.view() is not first and entry.view().in_flight == 1
        entry.load = worker_pb2.WorkerLoad(running_requests=3, queued_tokens=70)  # a fresh report
        view = entry.view()
        assert (view.running_requests, view.queued_tokens) == (3, 70)
        entry.healthy = False
        assert entry.view() is not view and not entry.view().healthy
        await channel.close()
    asyncio.run(scenario())


def test_labelled_children_are_cached_and_count_like_labels() -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "doc", ["api", "status"], registry=registry)
    child = labelled(counter, "grpc", "200")
    assert labelled(counter, "grpc", "200") is child is counter.labels(api="grpc", status="200")
    child.inc()
    labelled(counter, "grpc", "429").inc(2)
    assert registry.get_sample_value("c_total", {"api": "grpc", "status": "200"}) == 1
    assert registry.get_sample_value("c_total", {"api": "grpc", "status": "429"}) == 2
