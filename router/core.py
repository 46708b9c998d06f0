"""The router core: the workers, the policies, and a stream per request.

`RouterCore` owns the worker registry (health, load, breakers), the routing policies and
decider, the router's queue of requests waiting for room, and its metrics. Each request
runs as a `Pipeline` (router/pipeline.py: room, select, execute, recover) in the task of
its `RequestStream` (router/stream.py), the one pump between the core and the client:
`open_stream(request)` starts it, `abort(request_id)` cancels it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import AsyncIterator

from baton.protos.errors import BatonError, ErrorCode
from baton.router.admission import RoomQueue
from baton.router.config import RouterConfig
from baton.router.decider import DisaggDecider
from baton.router.metrics import RouterMetrics, WorkerCountersCollector
from baton.router.pipeline import Pipeline
from baton.router.policies.base import make_policy
from baton.router.registry import WorkerRegistry
from baton.router.breaker import BreakerState
from baton.router.stream import RequestStream
from baton.router.types import Chunk, Role, RouterRequest

log = logging.getLogger(__name__)


class RouterCore:
    """Worker selection, dispatch, retries and migration for every request."""

    def __init__(self, config: RouterConfig, tokenizer=None) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.registry = WorkerRegistry(config)
        self.metrics.registry.register(WorkerCountersCollector(lambda: list(self.registry.workers.values())))
        self.model_name = config.served_model_name or Path(config.model or "model").name
        self.tokenizer = tokenizer
        self.max_model_len = 0
        self.prefill_policy = make_policy(config.prefill_policy)
        self.decode_policy = make_policy(config.decode_policy)
        self.decider = DisaggDecider(config.decode_only_threshold)
        self.decode_prefixes = make_policy("cache_aware")
        """Approximate record of what each decode worker has cached (for the decider's estimate)."""
        self.room = RoomQueue(config.max_queued_requests, retry_after_s=config.retry_after_s)
        self.registry.on_report = self.room.wake
        self._active: dict[str, RequestStream] = {}
        for address in config.addresses(config.prefill):
            self.registry.add(address, Role.PREFILL)
        for address in config.addresses(config.decode):
            self.registry.add(address, Role.DECODE)

    # --- life ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start health checking."""
        self.registry.start()

    async def stop(self) -> None:
        """Cancel running requests and stop health checking."""
        for stream in list(self._active.values()):
            stream.cancel()
        await self.registry.stop()

    async def refresh_worker_loads(self) -> None:
        """Before a metrics scrape: fresh load reports from every worker, and the health and
        breaker gauges set from them."""
        await self.registry.check_all()
        for entry in self.registry.workers.values():
            self.metrics.worker_healthy.labels(worker=entry.address, role=entry.role.value).set(int(entry.healthy))
            self.metrics.breaker_open.labels(worker=entry.address).set(int(entry.breaker.state is not BreakerState.CLOSED))

    def is_serving(self) -> bool:
        """True when at least one decode worker is healthy."""
        return self.registry.healthy_count(Role.DECODE) > 0

    def worker_statuses(self) -> list[dict]:
        """Operators' view of every worker."""
        rows = []
        for entry in self.registry.workers.values():
            load = entry.load
            rows.append({"address": entry.address, "role": entry.role.value, "healthy": entry.healthy,
                         "breaker": entry.breaker.state.value, "in_flight": entry.in_flight, "error": entry.last_error,
                         "load": {"running_requests": load.running_requests, "queued_requests": load.queued_requests,
                                  "running_tokens": load.running_tokens, "queued_tokens": load.queued_tokens,
                                  "kv_usage": round(load.kv_usage, 4), "prefix_hit_rate": round(load.prefix_hit_rate, 4),
                                  "max_requests": load.max_requests, "reserved_requests": load.reserved_requests}})
        return rows

    async def abort(self, request_id: str) -> bool:
        """Cancel a request wherever it runs (the decode worker sees the cancellation);
        True when it was running here."""
        stream = self._active.get(request_id)
        return stream is not None and stream.cancel()

    # --- requests ------------------------------------------------------------------
    def open_stream(self, request: RouterRequest) -> RequestStream:
        """Start serving a request; its chunks (or the BatonError that ended it) come out of
        the returned stream. A full router queue refuses it there with OVERLOADED; an id that
        is already running is refused here with INVALID_REQUEST."""
        metrics = self.metrics

        async def pipeline(emit) -> None:
            try:
                await Pipeline(self, self.room, request, emit).run()
            except BatonError as error:
                metrics.failures.labels(reason=error.code_name.lower()).inc()
                level = logging.INFO if error.code in (ErrorCode.ABORTED, ErrorCode.INVALID_REQUEST) else logging.WARNING
                log.log(level, "request %s ended with %s", request.request_id, error)
                raise

        def ended(stream: RequestStream) -> None:
            if self._active.get(request.request_id) is stream:
                del self._active[request.request_id]
            metrics.in_flight.set(len(self._active))

        if request.request_id in self._active:  # never hijack the running request's stream
            raise BatonError(ErrorCode.INVALID_REQUEST, f"request id {request.request_id!r} is already running")
        stream = RequestStream(request.request_id, pipeline, ended)
        self._active[request.request_id] = stream
        metrics.in_flight.set(len(self._active))
        return stream

    async def generate(self, request: RouterRequest) -> AsyncIterator[Chunk]:
        """The request's chunks as an async iterator (closing it aborts the request)."""
        stream = self.open_stream(request)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            stream.close()
