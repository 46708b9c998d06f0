"""The worker registry: which prefill and decode workers exist, whether each is healthy,
how loaded it is, and its circuit breaker.

Workers come from flags (static) or `RegisterWorker` / `DeregisterWorker` (dynamic). A
background loop checks every worker each `health_interval_s`: the standard
`grpc.health.v1` Check says whether it serves, and the worker's `Info` brings its load
report (running / queued tokens, KV usage, capacity). A busy worker is not a dead one:
a worker is unhealthy at once when it says NOT_SERVING or draining, or when it cannot be
reached (connection refused); a check that only timed out (a saturated worker answering
late) makes it unhealthy after `unhealthy_after_failures` such checks in a row. A later
passing check makes it healthy again.

Room: `WorkerEntry.has_room()` says whether the router may send the worker one more
request: its in-flight count (what the router sent and has not seen end) is below the
capacity the worker reports, and it has not refused with OVERLOADED in the last
`saturated_s` (cleared early when one of its requests ends).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc
from baton.protos.cluster_auth import open_channel
from baton.router.breaker import CircuitBreaker
from baton.router.config import RouterConfig
from baton.router.decode_stream import DecodeStreamClient
from baton.router.types import Role, WorkerView

log = logging.getLogger(__name__)


@dataclass
class WorkerEntry:
    """Everything the router tracks about one worker."""

    address: str
    role: Role
    breaker: CircuitBreaker
    channel: grpc.aio.Channel
    healthy: bool = False
    load: worker_pb2.WorkerLoad = field(default_factory=worker_pb2.WorkerLoad)
    in_flight: int = 0
    prefill_tokens_in_flight: int = 0
    """Prefill role: prompt tokens of requests sent here whose first token has not come back yet (the
    router's own, fresh view of the backlog; load reports come once per health interval)."""
    epoch: int = 0
    last_error: str = ""
    failed_checks: int = 0
    """Health checks in a row that timed out or errored without the worker being unreachable."""
    saturated_until: float = 0.0
    """monotonic time until which the worker counts as full (it answered OVERLOADED)."""
    metrics_port: int = 0
    """The worker's Prometheus port, from its Info (0: unknown or none)."""
    use_decode_stream: bool = True
    """Send decode requests on one multiplexed stream (router/decode_stream.py) rather than a call each."""
    _stub: Optional[worker_pb2_grpc.DecodeStub] = field(default=None, repr=False)
    _streams: Optional[DecodeStreamClient] = field(default=None, repr=False)
    _view: Optional[WorkerView] = field(default=None, repr=False)
    _view_load: Optional[worker_pb2.WorkerLoad] = field(default=None, repr=False)

    def has_room(self, now: float) -> bool:
        """True when one more request may be sent now (see the module doc)."""
        if now < self.saturated_until:
            return False
        capacity = self.load.max_requests
        return capacity == 0 or self.in_flight < capacity

    def mark_saturated(self, now: float, seconds: float) -> None:
        """The worker refused with OVERLOADED: no more work for `seconds` (or until a request ends)."""
        self.saturated_until = max(self.saturated_until, now + seconds)

    def view(self) -> WorkerView:
        """The snapshot policies read, shared and never mutated: rebuilt only when the load
        report (replaced, never edited), health or in-flight count changed since the last
        one (every request reads every candidate's view)."""
        load, view = self.load, self._view
        if (view is not None and self._view_load is load and view.healthy == self.healthy
                and view.in_flight == self.in_flight):
            return view
        self._view_load = load
        self._view = WorkerView(address=self.address, role=self.role, healthy=self.healthy,
                                running_requests=load.running_requests, queued_requests=load.queued_requests,
                                running_tokens=load.running_tokens, queued_tokens=load.queued_tokens,
                                kv_usage=load.kv_usage, in_flight=self.in_flight,
                                recent_ttft_ms=load.recent_ttft_ms, recent_itl_ms=load.recent_itl_ms)
        return self._view

    def decode_stub(self) -> worker_pb2_grpc.DecodeStub:
        """The stub on this worker's channel (made once)."""
        if self._stub is None:
            self._stub = worker_pb2_grpc.DecodeStub(self.channel)
        return self._stub

    def generate(self, request: worker_pb2.DecodeRequest, timeout: float):
        """Start `Decode.Generate` on this worker: on its shared stream, else a separate call.
        Requests with images (megabytes each way) or prompt logprobs (a response as large as the
        prompt times its top-k) get a call of their own: one message past the channel's limit
        would break the stream for every request on it. Either reads and cancels as a `grpc.aio`
        call."""
        if not self.use_decode_stream or request.images or request.params.HasField("prompt_logprobs"):
            return self.decode_stub().Generate(request, timeout=timeout)
        if self._streams is None:
            self._streams = DecodeStreamClient(self.address, self.decode_stub())
        return self._streams.generate(request, timeout)

    def retire_streams(self) -> None:
        """The worker stopped serving (draining): end its shared stream once idle."""
        if self._streams is not None:
            self._streams.retire_stream()

    def close_streams(self) -> None:
        """Fail the calls on the shared stream (the worker is being forgotten)."""
        if self._streams is not None:
            self._streams.close()


class WorkerRegistry:
    """Workers by address, their health loop, and candidate lists for the policies."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.workers: dict[str, WorkerEntry] = {}
        self._task: Optional[asyncio.Task] = None
        self._checked = asyncio.Event()
        self.on_report: Optional[Callable[[], None]] = None
        """Called after each fresh load report (the router wakes requests waiting for room)."""

    def add(self, address: str, role: Role) -> bool:
        """Register a worker (no-op when known with the same role); returns True when added."""
        known = self.workers.get(address)
        if known is not None and known.role is role:
            return False
        breaker = CircuitBreaker(self.config.breaker_failures, self.config.breaker_cooldown_s)
        self.workers[address] = WorkerEntry(address, role, breaker,
                                            open_channel(address, self.config.cluster_credentials),
                                            use_decode_stream=self.config.decode_stream)
        return True

    async def remove(self, address: str) -> bool:
        """Forget a worker; returns True when it was known."""
        entry = self.workers.pop(address, None)
        if entry is None:
            return False
        entry.close_streams()
        await entry.channel.close()
        return True

    def candidates(self, role: Role, exclude: set[str] = frozenset()) -> list[WorkerEntry]:
        """Healthy workers of a role whose breaker lets work through, minus `exclude`."""
        return [e for e in self.workers.values()
                if e.role is role and e.healthy and e.address not in exclude and e.breaker.available()]

    def alive(self, role: Role) -> list[WorkerEntry]:
        """Healthy workers of a role, whatever their breakers say."""
        return [e for e in self.workers.values() if e.role is role and e.healthy]

    def healthy_count(self, role: Role) -> int:
        """Workers of a role that passed their last health check."""
        return sum(1 for e in self.workers.values() if e.role is role and e.healthy)

    # --- health loop ---------------------------------------------------------------
    def start(self) -> None:
        """Start the background health/load loop."""
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop and close every channel."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for entry in list(self.workers.values()):
            await entry.channel.close()

    async def wait_first_check(self, timeout: float) -> None:
        """Wait until every worker has been checked once."""
        await asyncio.wait_for(self._checked.wait(), timeout)

    async def _loop(self) -> None:
        while True:
            await self.check_all()
            self._checked.set()
            await asyncio.sleep(self.config.health_interval_s)

    async def check_all(self) -> None:
        """Check every worker once, concurrently."""
        await asyncio.gather(*(self._check(e) for e in list(self.workers.values())))

    async def _check(self, entry: WorkerEntry) -> None:
        timeout = self.config.health_timeout_s
        try:
            health = await health_pb2_grpc.HealthStub(entry.channel).Check(health_pb2.HealthCheckRequest(),
                                                                           timeout=timeout)
            serving = health.status == health_pb2.HealthCheckResponse.SERVING
            info = None
            if serving:
                stub = (worker_pb2_grpc.DecodeStub if entry.role is Role.DECODE else worker_pb2_grpc.PrefillStub)
                info = await stub(entry.channel).Info(worker_pb2.WorkerInfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            why = f"{error.code().name}: {error.details()}"
            entry.failed_checks += 1
            unreachable = error.code() == grpc.StatusCode.UNAVAILABLE
            if unreachable or entry.failed_checks >= self.config.unhealthy_after_failures:
                self._mark(entry, False, why)
            else:
                log.info("worker %s: health check %d failed (%s); still counted healthy", entry.address,
                         entry.failed_checks, why)
            return
        entry.failed_checks = 0
        if info is not None:
            entry.load = info.load
            if entry.epoch and info.epoch != entry.epoch:
                log.info("worker %s restarted (epoch %s -> %s)", entry.address, entry.epoch, info.epoch)
                entry.breaker.record_success()
            entry.epoch = info.epoch
            entry.metrics_port = info.metrics_port
        self._mark(entry, serving and info is not None and not info.draining, "" if serving else "not serving")
        if self.on_report is not None:
            self.on_report()

    @staticmethod
    def _mark(entry: WorkerEntry, healthy: bool, error: str) -> None:
        if not healthy:  # draining or gone: a stopping server must not wait out its grace for an idle stream
            entry.retire_streams()
        if entry.healthy and not healthy:
            log.warning("worker %s is unhealthy: %s", entry.address, error)
        elif healthy and not entry.healthy and entry.last_error:
            log.info("worker %s is healthy again", entry.address)
        entry.healthy, entry.last_error = healthy, error

    def mark_failed(self, address: str, error: str) -> None:
        """A request saw the worker fail: unhealthy until the next passing check."""
        entry = self.workers.get(address)
        if entry is not None:
            self._mark(entry, False, error)
