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
from typing import AsyncIterator, Optional

from baton.protos.errors import BatonError, ErrorCode
from baton.router.admission import RoomQueue
from baton.router.auth import Caller
from baton.router.config import RouterConfig
from baton.router.decider import DisaggDecider
from baton.router.metrics import RouterMetrics, WorkerCountersCollector
from baton.router.pipeline import Pipeline
from baton.router.kv_events import KVEventSubscriber, KVIndexCollector
from baton.router.kv_index import KVIndex
from baton.router.policies import policy_options
from baton.router.policies.base import make_policy
from baton.router.registry import WorkerRegistry
from baton.router.replicas import ReplicaSet
from baton.router.breaker import BreakerState
from baton.router.stream import RequestStream
from baton.router.types import Chunk, Role, RouterRequest

log = logging.getLogger(__name__)


def _encoder_resolver(config: RouterConfig):
    """How `--discover-encoders` is resolved: through Ray's named actors on `--ray-address`
    (`baton up --ray`), else DNS (None: the pool's default)."""
    if config.ray_address and config.discover_encoders:
        from baton.router.ray_discovery import RayWorkerResolver
        return RayWorkerResolver(config.ray_namespace)
    return None


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
        self.prefill_policy = make_policy(config.prefill_policy, **policy_options(config.prefill_policy, config))
        self.decode_policy = make_policy(config.decode_policy, **policy_options(config.decode_policy, config))
        self.decider = DisaggDecider(config.decode_only_threshold, config.prefill_backlog_limit)
        self.decode_prefixes = make_policy("cache_aware")
        """Approximate record of what each decode worker has cached (for the decider's estimate)."""
        self.room = RoomQueue(config.max_queued_requests, retry_after_s=config.retry_after_s)
        self.registry.on_report = self.room.wake
        self.replicas = None
        """The other router replicas (`--router-peers`), whose live count sets this one's queue share."""
        if config.router_peers:
            self.replicas = ReplicaSet(config.addresses(config.router_peers), self._set_replicas,
                                       interval_s=config.health_interval_s, timeout_s=config.health_timeout_s,
                                       credentials=config.cluster_credentials)
        self.kv_index = KVIndex(config.kv_index_max_entries, config.kv_pending_ttl_s, config.kv_pending_max_entries)
        """Which worker holds which KV block, from their KV events (router/kv_index.py)."""
        self.kv_events = KVEventSubscriber(self.registry, self.kv_index) if config.kv_events else None
        if self.kv_events is not None:
            self.metrics.registry.register(KVIndexCollector(self.kv_events))
            for policy in (self.prefill_policy, self.decode_policy, self.decode_prefixes):
                if hasattr(policy, "attach_index"):
                    policy.attach_index(self.kv_index)
        from baton.router.encoders import EncoderPool
        self.encoders = EncoderPool(config.addresses(config.encoders), config.encoder_policy,
                                    config.cluster_credentials, config.health_interval_s, config.health_timeout_s,
                                    discover=config.discover_encoders, resolver=_encoder_resolver(config))
        """The encoders image requests are sent to (router/encoders.py); empty: workers encode."""
        self._active: dict[str, RequestStream] = {}
        self._owners: dict[str, str] = {}
        """Request id -> the fingerprint of the key that started it (router/auth.py)."""
        for address in config.addresses(config.prefill):
            self.registry.add(address, Role.PREFILL)
        for address in config.addresses(config.decode):
            self.registry.add(address, Role.DECODE)

    # --- life ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start health checking."""
        self.registry.start()
        self.encoders.start()
        if self.kv_events is not None:
            self.kv_events.start()
        if self.replicas is not None:
            self.replicas.start()

    async def stop(self) -> None:
        """Cancel running requests and stop health checking."""
        for stream in list(self._active.values()):
            stream.cancel()
        if self.kv_events is not None:
            await self.kv_events.stop()
        if self.replicas is not None:
            await self.replicas.stop()
        await self.registry.stop()
        await self.encoders.stop()

    def _set_replicas(self, live: int) -> None:
        """`live` router replicas serve: this one holds its share of the cluster's queue limit."""
        self.room.limit = ReplicaSet.share(self.config.max_queued_requests, live)
        self.metrics.live_replicas.set(live)

    async def refresh_worker_loads(self) -> None:
        """Before a metrics scrape: the health and breaker gauges set from the registry (whose
        health loop keeps loads current every `health_interval_s`: a scrape checks no worker)."""
        for entry in self.registry.workers.values():
            self.metrics.worker_healthy.labels(worker=entry.address, role=entry.role.value).set(int(entry.healthy))
            self.metrics.breaker_open.labels(worker=entry.address).set(int(entry.breaker.state is not BreakerState.CLOSED))

    def is_serving(self) -> bool:
        """True when at least one decode worker is healthy (and no more than
        `max_unhealthy_workers` workers are unhealthy, when that is set)."""
        limit = self.config.max_unhealthy_workers
        if limit >= 0 and sum(1 for e in self.registry.workers.values() if not e.healthy) > limit:
            return False
        return self.registry.healthy_count(Role.DECODE) > 0

    def worker_statuses(self) -> list[dict]:
        """Operators' view of every worker."""
        rows = []
        for entry in self.registry.workers.values():
            load = entry.load
            host = entry.address.rsplit(":", 1)[0]
            rows.append({"address": entry.address, "role": entry.role.value, "healthy": entry.healthy,
                         "breaker": entry.breaker.state.value, "in_flight": entry.in_flight, "error": entry.last_error,
                         "metrics": f"{host}:{entry.metrics_port}" if entry.metrics_port else "",
                         # a down worker's last report is stale: no load for it
                         "load": None if not entry.healthy else {
                                  "running_requests": load.running_requests, "queued_requests": load.queued_requests,
                                  "running_tokens": load.running_tokens, "queued_tokens": load.queued_tokens,
                                  "kv_usage": round(load.kv_usage, 4), "prefix_hit_rate": round(load.prefix_hit_rate, 4),
                                  "max_requests": load.max_requests, "reserved_requests": load.reserved_requests},
                         "prefix_source": self.kv_events.source(entry.address) if self.kv_events else "approximate",
                         # blocks this router sent there that its KV events have not stored yet (scored as cached)
                         "pending_kv_blocks": self.kv_index.pending_blocks(entry.address)})
        return rows

    async def abort(self, request_id: str, caller: Optional[Caller] = None) -> bool:
        """Cancel a request wherever it runs (the decode worker sees the cancellation);
        True when it was running here. With `caller`, only a request that caller may abort
        (its own, or any for an admin): another key's request answers False, as if unknown."""
        stream = self._active.get(request_id)
        if stream is not None and caller is not None and not caller.may_abort(self._owners.get(request_id, "")):
            return False
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
                self._owners.pop(request.request_id, None)
            metrics.in_flight.set(len(self._active))

        if request.request_id in self._active:  # never hijack the running request's stream
            raise BatonError(ErrorCode.INVALID_REQUEST, f"request id {request.request_id!r} is already running")
        stream = RequestStream(request.request_id, pipeline, ended)
        self._active[request.request_id] = stream
        self._owners[request.request_id] = request.owner
        metrics.in_flight.set(len(self._active))
        return stream

    async def embed(self, inputs: list[list[int]], *, pooling: str = "last", normalize: bool = True):
        """The pooled embedding of every input (token ids) from a decode worker
        (router/embedding.py); raises BatonError."""
        from baton.router.embedding import embed
        return await embed(self, inputs, pooling=pooling, normalize=normalize,
                           timeout_s=self.config.request_timeout_s)

    async def generate(self, request: RouterRequest) -> AsyncIterator[Chunk]:
        """The request's chunks as an async iterator (closing it aborts the request)."""
        stream = self.open_stream(request)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            stream.close()
