"""What a prefill or decode worker process holds at run time, shared by both servicers.

Owns the start-up order (the gRPC server is already answering health NOT_SERVING while
the model loads; then the engine thread and the transfer engine start and health turns
SERVING), admission (refuse new work while loading, draining or over the queue limit),
the `Info` answer, per-worker Prometheus metrics, and the drain that finishes running
requests before the process exits.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from baton.protos.baton.v1 import worker_pb2
from baton.services.worker.engine_thread import EngineThread
from baton.protos.errors import BatonError, ErrorCode
from baton.services.worker.wire import worker_load
from baton.services.worker.worker_config import WorkerConfig
from baton.services.engine.config import EngineConfig
from baton.services.transfer.base import TransferEngine
from baton.services.transfer.factory import create_transfer_engine
from baton.services.worker.kv_memory import register_kv_cache

log = logging.getLogger(__name__)


class WorkerMetrics:
    """The `baton_` metrics of one worker, on its own registry."""

    def __init__(self, role: str, backend: str = "") -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"role": role}
        self.requests = Counter("baton_worker_requests", "Requests by outcome", ["role", "status"], registry=r)
        self.tokens = Counter("baton_worker_generated_tokens", "Tokens sampled", ["role"], registry=r).labels(**labels)
        self.ttft = Histogram("baton_worker_time_to_first_token_seconds", "Time to the first token", ["role"],
                              registry=r).labels(**labels)
        self.transfer_bytes = Counter("baton_kv_transfer_bytes", "KV bytes moved", ["role", "backend", "direction"],
                                      registry=r)
        self.transfer_seconds = Histogram("baton_kv_transfer_seconds", "KV hand-off latency", ["role", "backend"],
                                          registry=r)
        self.transfer_failures = Counter("baton_kv_transfer_failures", "Failed KV transfers", ["role", "backend"],
                                         registry=r)
        self.running = Gauge("baton_worker_running_requests", "Requests in the running batch", ["role"],
                             registry=r).labels(**labels)
        self.queued = Gauge("baton_worker_queued_requests", "Requests waiting", ["role"], registry=r).labels(**labels)
        self.kv_usage = Gauge("baton_worker_kv_usage", "Fraction of KV blocks in use", ["role"],
                              registry=r).labels(**labels)
        self.prefix_hit = Gauge("baton_worker_prefix_cache_hit_ratio", "Prefix-cache tokens matched / looked up",
                                ["role"], registry=r).labels(**labels)
        if backend:  # the KV transfer series exist (at 0) from the start, not only after the first transfer
            self.transfer_failures.labels(role=role, backend=backend)
            self.transfer_seconds.labels(role=role, backend=backend)
            self.transfer_bytes.labels(role=role, backend=backend, direction="out" if role == "prefill" else "in")

    def observe_load(self, load: worker_pb2.WorkerLoad) -> None:
        """Refresh the gauges from a load report."""
        self.running.set(load.running_requests)
        self.queued.set(load.queued_requests)
        self.kv_usage.set(load.kv_usage)
        self.prefix_hit.set(load.prefix_hit_rate)


class WorkerRuntime:
    """Engine thread + transfer engine + admission state of one worker."""

    def __init__(self, role: int, engine_config: EngineConfig, worker_config: WorkerConfig) -> None:
        self.role = role
        self.role_name = worker_pb2.WorkerRole.Name(role).lower()
        self.engine_config = engine_config
        self.config = worker_config
        self.metrics = WorkerMetrics(self.role_name, worker_config.transfer)
        self.worker_id = worker_config.worker_id
        self.thread: Optional[EngineThread] = None
        self.transfer: Optional[TransferEngine] = None
        self.ready = False
        self.draining = False
        self.load_error: Optional[BaseException] = None
        self.transfer_failures = 0
        """KV transfers that failed on this worker (also in the labelled metric)."""

    # --- start-up ------------------------------------------------------------------
    async def load(self, worker_id: str) -> None:
        """Load the model and start the engine thread and the transfer engine."""
        from baton.services.engine.disagg import DisaggEngine
        self.worker_id = self.config.worker_id or worker_id
        engine = await asyncio.to_thread(DisaggEngine, self.engine_config)
        self.transfer = await asyncio.to_thread(create_transfer_engine, self.config.transfer, self.worker_id,
                                                register_kv_cache(engine.kv_cache), **self._transfer_options())
        self.thread = EngineThread(engine, asyncio.get_running_loop())
        self.thread.start()
        self.ready = True
        log.info("%s worker %s ready (epoch %s)", self.role_name, self.worker_id, self.transfer.epoch)

    def _transfer_options(self) -> dict:
        """Where the tcp backend listens and what it advertises (nixl picks its own addresses)."""
        if self.config.transfer != "tcp":
            return {}
        return {"host": self.config.transfer_host, "advertise_host": self.config.advertise_host or None}

    def close(self) -> None:
        """Stop the engine thread and the transfer engine."""
        if self.thread is not None:
            self.thread.stop()
        if self.transfer is not None:
            self.transfer.close()

    # --- admission -----------------------------------------------------------------
    def check_accepting(self) -> None:
        """Raise the BatonError that refuses new work now, if any."""
        if self.draining:
            raise BatonError(ErrorCode.DRAINING, f"{self.role_name} worker {self.worker_id} is draining")
        if not self.ready:
            raise BatonError(ErrorCode.NOT_READY, f"{self.role_name} worker is still loading its model")
        waiting = self.thread.engine.scheduler.num_waiting
        if waiting >= self.config.max_queued_requests:
            raise BatonError(ErrorCode.OVERLOADED, f"{waiting} requests already queued")

    # --- info & drain --------------------------------------------------------------
    def info(self) -> worker_pb2.WorkerInfo:
        """The Info RPC's answer."""
        info = worker_pb2.WorkerInfo(role=self.role, worker_id=self.worker_id or "", model=self.engine_config.model,
                                     ready=self.ready, draining=self.draining)
        if self.ready:
            info.epoch = self.transfer.epoch
            info.transfer.CopyFrom(self.transfer.descriptor().to_proto())
            engine = self.thread.engine
            load = worker_load(engine, self.transfer, self.transfer_failures,
                               max_requests=engine.config.max_running_requests + self.config.max_queued_requests)
            self.metrics.observe_load(load)
            info.load.CopyFrom(load)
        return info

    async def abort(self, request_id: str) -> worker_pb2.AbortResponse:
        """The Abort RPC's answer: stop the request wherever it is in the engine."""
        if self.thread is None:
            return worker_pb2.AbortResponse(found=False)
        deltas = await self.thread.call(lambda e: e.abort(request_id))
        return worker_pb2.AbortResponse(found=bool(deltas))

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work and wait (bounded) for running requests to finish."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.thread is not None and self.thread.has_streams() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
