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
from baton.protos.cluster_auth import OPEN, ClusterCredentials, derive_key
from baton.services.worker.engine_thread import EngineThread
from baton.services.worker.grammar_pool import GrammarPool
from baton.protos.errors import BatonError, ErrorCode
from baton.services.worker.wire import worker_load
from baton.services.worker.recent_latency import RecentMean
from baton.services.worker.worker_config import WorkerConfig
from baton.services.engine.config import EngineConfig
from baton.services.transfer.base import TransferEngine
from baton.services.transfer.factory import create_transfer_engine
from baton.services.worker.kv_memory import register_kv_cache

log = logging.getLogger(__name__)

HANDBACK_S = 0.5
"""The end of a drain's limit kept for handing running requests back (their DRAINING answers)."""


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
        self.transfer_seconds = Histogram("baton_kv_transfer_seconds", "KV transfer alone (the prefill worker's "
                                          "write of the blocks)", ["role", "backend"], registry=r)
        self.remote_prefill = Histogram("baton_worker_remote_prefill_seconds", "Decode's Prefill call to a prefill "
                                        "worker: its queueing, compute and KV hand-off", ["role"], registry=r,
                                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.transfer_failures = Counter("baton_kv_transfer_failures", "Failed KV transfers", ["role", "backend"],
                                         registry=r)
        self.running = Gauge("baton_worker_running_requests", "Requests in the running batch", ["role"],
                             registry=r).labels(**labels)
        self.queued = Gauge("baton_worker_queued_requests", "Requests waiting", ["role"], registry=r).labels(**labels)
        self.kv_usage = Gauge("baton_worker_kv_usage", "Fraction of KV blocks in use", ["role"],
                              registry=r).labels(**labels)
        self.prefix_hit = Gauge("baton_worker_prefix_cache_hit_ratio", "Prefix-cache tokens matched / looked up",
                                ["role"], registry=r).labels(**labels)
        self.engine_step = Histogram("baton_worker_engine_step_seconds", "Wall time of one engine step (schedule, "
                                     "launch, settle) on the engine thread", ["role"], registry=r,
                                     buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5,
                                              1.0, 2.5)).labels(**labels)
        scheduled = Counter("baton_worker_engine_scheduled_tokens", "Tokens the engine's steps scheduled, by kind "
                            "(prefill: prompt chunks; decode: one per running request)", ["role", "kind"], registry=r)
        self.engine_tokens = (scheduled.labels(role=role, kind="prefill"), scheduled.labels(role=role, kind="decode"))
        if backend:  # the KV transfer series exist (at 0) from the start, not only after the first transfer
            self.transfer_failures.labels(role=role, backend=backend)
            self.transfer_seconds.labels(role=role, backend=backend)
            if role == "decode":
                self.remote_prefill.labels(role=role)
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
        self._recent_ttft = RecentMean(self.metrics.registry, "baton_worker_time_to_first_token_seconds",
                                       {"role": self.role_name})
        self.worker_id = worker_config.worker_id
        self.thread: Optional[EngineThread] = None
        self.grammars: Optional[GrammarPool] = None
        """Compiles requests' grammars off the engine thread (set once loaded)."""
        self.transfer: Optional[TransferEngine] = None
        self.ready = False
        self.draining = False
        self.load_error: Optional[BaseException] = None
        self.transfer_failures = 0
        """KV transfers that failed on this worker (also in the labelled metric)."""
        self.images = None
        """`images.WorkerImages` when the model is a vision-language model (placeholder expansion, embeddings)."""
        self.credentials: ClusterCredentials = OPEN
        """The cluster credentials (set by worker_main from the server's): channels to peers carry
        them, and the KV transfer handshake proves the secret."""
        self.server_host = "127.0.0.1"
        self.metrics_port = 0
        """The Prometheus port this worker serves (set by worker_main; 0: none), reported in `Info`."""
        """The gRPC server's --host: where the tcp KV listener binds unless --transfer-host says otherwise."""

    # --- start-up ------------------------------------------------------------------
    async def load(self, worker_id: str) -> None:
        """Load the model and start the engine thread and the transfer engine."""
        from baton.services.engine.disagg import DisaggEngine
        if self.engine_config.tp_size > 1 and self.role_name == "prefill":  # rank 0 holds 1/tp of the KV heads
            raise ValueError(f"--tp {self.engine_config.tp_size} on a prefill worker: handing off a tensor-parallel "
                             "KV cache (each rank holds its share of the heads) is not built yet; run prefill "
                             "workers with --tp 1, or decode workers alone (docs/parallel.md)")
        self.worker_id = self.config.worker_id or worker_id
        engine = await asyncio.to_thread(DisaggEngine, self.engine_config)
        self.transfer = await asyncio.to_thread(create_transfer_engine, self.config.transfer, self.worker_id,
                                                register_kv_cache(engine.kv_cache), **self._transfer_options())
        if engine.model_config.multimodal:
            from baton.services.worker.images import WorkerImages
            backend = "tcp" if self.config.transfer in ("cuda_ipc", "nccl") else self.config.transfer  # host memory
            self.images = await asyncio.to_thread(
                WorkerImages.create, str(engine.parts.model_path), engine.runner.device, engine.parts.dtype,
                self.role_name, self.worker_id, backend, self._transfer_options(), self.metrics.registry,
                self.credentials)
        self.thread = EngineThread(engine, asyncio.get_running_loop(),
                                   stats_interval_s=self.engine_config.log_stats_interval_s,
                                   step_seconds=self.metrics.engine_step, scheduled_tokens=self.metrics.engine_tokens)
        self.grammars = GrammarPool(engine, self.config.max_grammar_bytes, self.config.grammar_compile_timeout_s,
                                    self.config.grammar_compile_threads)
        self.thread.start()
        self.ready = True
        log.info("%s worker %s ready (epoch %s)", self.role_name, self.worker_id, self.transfer.epoch)

    def _transfer_options(self) -> dict:
        """Where the tcp backend listens and what it advertises (nixl picks its own addresses), and the
        key its handshake proves (derived from the cluster secret; empty for an open cluster)."""
        auth = {"auth_key": derive_key(self.credentials.secret, "kv transfer")}
        if self.config.transfer not in ("tcp", "cuda_ipc", "nccl"):  # cuda_ipc's and nccl's control plane is tcp's
            return auth
        return {"host": self.config.transfer_host or self.server_host,
                "advertise_host": self.config.advertise_host or None, **auth}

    def close(self) -> None:
        """Stop the engine thread and the transfer engine."""
        if self.thread is not None:
            self.thread.stop()
        if self.grammars is not None:
            self.grammars.close()
        if self.transfer is not None:
            self.transfer.close()
        if self.images is not None:
            self.images.close()

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
                                     ready=self.ready, draining=self.draining, metrics_port=self.metrics_port)
        if self.ready:
            info.epoch = self.transfer.epoch
            info.transfer.CopyFrom(self.transfer.descriptor().to_proto())
            engine = self.thread.engine
            load = worker_load(engine, self.transfer, self.transfer_failures,
                               max_requests=engine.config.max_running_requests + self.config.max_queued_requests)
            load.recent_ttft_ms = self._recent_ttft.update()  # for the router's min_latency policy
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
        """Refuse new work, let running requests finish for up to `timeout_s` (--drain-timeout-s),
        then hand the rest back: each open stream fails with DRAINING, which the router answers by
        moving it to another decode worker (a migration that resumes its state)."""
        self.draining = True
        handback_s = min(HANDBACK_S, timeout_s / 4)  # kept for the hand-back, inside the server's limit
        deadline = time.monotonic() + timeout_s - handback_s
        while self.thread is not None and self.thread.has_streams() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.thread is None or not self.thread.has_streams():
            return
        log.warning("drain: %d requests still running past --drain-timeout-s (%.1f s); handing them back",
                    self.thread.open_streams, timeout_s)
        self.thread.fail_streams(BatonError(ErrorCode.DRAINING, f"{self.role_name} worker {self.worker_id} drained "
                                                                f"past its {timeout_s:g} s limit; move the request"))
        deadline += handback_s
        while self.thread.has_streams() and time.monotonic() < deadline:  # their DRAINING answers go out
            await asyncio.sleep(0.01)
