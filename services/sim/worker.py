"""One simulated worker: its server, KV memory, admission, load report and faults.

`SimWorker` owns a `ServiceServer` (health, reflection; no metrics port) serving the real
`baton.v1.Prefill` or `baton.v1.Decode` service (services/sim/servicer.py) and
`baton.v1.KVEvents`, a `SimKVCache` whose changes feed a `KVEventPublisher`, and the state
the router reads through `Info`: running and queued requests, tokens, KV usage, prefix hit
rate, capacity, recent TTFT / ITL. Many live in one asyncio loop (services/sim/cluster.py).

Admission: a request is refused with DRAINING when the worker drains, with OVERLOADED when
`sim_max_running + sim_max_queued` requests are already admitted (or the fault injection
draws it); otherwise it waits for one of `sim_max_running` slots and for KV room. Its cache
match happens when its prefill starts (`allocate`), as a real engine's scheduler matches its
radix cache when it schedules a waiting request: when the next page its prompt lacks is being
prefilled here by another request, it waits for that prefill (counted as queued, bounded by
its deadline) and then hits (SGLang likewise defers a request that shares a prefix with one
in the same batch).

Faults (`SimFaults`, or by hand: `kill()`, `hang()`, `set_serving()`): die (every call in
flight fails with UNAVAILABLE and the server stops with no grace, port closed: what a
client of a killed process sees), hang (streams and Info never
answer again, health still does: a wedged engine), OVERLOADED refusals, flapping health.
`slowdown` in the timing model slows everything.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Optional

import grpc

from baton.protos.baton.v1 import kv_pb2, worker_pb2, worker_pb2_grpc
from baton.protos.errors import BatonError, ErrorCode
from baton.services.common.server import ServerConfig, ServiceServer
from baton.services.sim.config import SimConfig, SimFaults, SimTiming
from baton.services.sim.kv_cache import Allocation, SimKVCache
from baton.services.worker.kv_events import KVEventPublisher, KVEventsServicer

log = logging.getLogger(__name__)

EWMA = 0.2
"""Weight of the newest sample in the recent TTFT / ITL averages."""


class SimWorker:
    """A prefill or decode worker with a timing model instead of a model."""

    def __init__(self, role: int, config: SimConfig = SimConfig(), timing: SimTiming = SimTiming(),
                 faults: SimFaults = SimFaults(), server: ServerConfig = ServerConfig(metrics_port=-1)) -> None:
        self.role = role
        self.role_name = worker_pb2.WorkerRole.Name(role).lower()
        self.config, self.timing, self.faults = config, timing, faults
        self.server_config = server
        self.kv = SimKVCache(config.sim_blocks, config.sim_block_size)
        self.server: Optional[ServiceServer] = None
        self.publisher: Optional[KVEventPublisher] = None
        self.epoch = random.getrandbits(62) or 1
        self.admitted = 0
        self.running = 0
        """Requests holding a slot (prefilling or decoding)."""
        self.waiting = 0
        self.running_tokens = 0
        """Context tokens of the requests holding a slot (the decode step's attention reads)."""
        self.queued_tokens = 0
        self.completed = 0
        self.recent_ttft_s = 0.0
        self.recent_itl_s = 0.0
        self.dead = False
        self.hung = False
        self._rng = random.Random(config.sim_seed)
        self._slots: Optional[asyncio.Semaphore] = None
        self._room: Optional[asyncio.Condition] = None
        self._tasks: set[asyncio.Task] = set()
        self._requests: dict[str, asyncio.Task] = {}

    # --- life --------------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> str:
        """Bind, serve and report SERVING; returns host:port."""
        from baton.services.sim.servicer import SimDecodeServicer, SimPrefillServicer
        loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.config.sim_max_running)
        self._room = asyncio.Condition()
        self._progress = asyncio.Event()
        self.kv.on_progress = self._on_progress
        self.publisher = KVEventPublisher(self.config.sim_block_size, loop, epoch=self.epoch)
        self.kv.publisher = self.publisher
        server = self.server = ServiceServer(self.server_config)
        if self.role == worker_pb2.DECODE:
            decode = SimDecodeServicer(self)
            server.add_servicer(worker_pb2_grpc.add_DecodeServicer_to_server, decode)
            server.add_stop_hook(decode.decode_streams.close)
        else:
            server.add_servicer(worker_pb2_grpc.add_PrefillServicer_to_server, SimPrefillServicer(self))
        if self.config.sim_kv_events:
            server.add_servicer(worker_pb2_grpc.add_KVEventsServicer_to_server, KVEventsServicer(self.publisher))
            server.add_stop_hook(self.publisher.close)
        await server.start()
        self.publisher.worker_id = server.address
        await server.set_serving(True)
        if self.faults.flap_health_s > 0:
            self._spawn(self._flap(self.faults.flap_health_s))
        return server.address

    async def kill(self) -> None:
        """Die at once: every stream is cut and the port closes (a killed process)."""
        if self.dead:
            return
        self.dead = True
        self._cancel_tasks()
        for task in list(self._requests.values()):  # each answers UNAVAILABLE, as a vanished peer
            task.cancel()
        await self.server.stop(0.05)  # calls arriving meanwhile are refused (DRAINING, or UNAVAILABLE)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop serving (in-flight calls get `grace` seconds)."""
        self.dead = True
        self._cancel_tasks()
        await self.server.stop(grace)

    def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    def hang(self) -> None:
        """Freeze: streams and Info stop answering; health still says SERVING."""
        self.hung = True

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING on health (a flapping or recovering worker)."""
        await self.server.set_serving(serving)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flap(self, period: float) -> None:
        serving = True
        while True:
            await asyncio.sleep(period)
            serving = not serving
            await self.server.set_serving(serving)

    # --- admission and room ------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Requests admitted at once (running + queued)."""
        return self.config.sim_max_running + self.config.sim_max_queued

    def admit(self, request_id: str) -> None:
        """Count a new request in, or raise the BatonError that refuses it."""
        if self.server.draining or self.dead:
            raise BatonError(ErrorCode.DRAINING, f"sim {self.role_name} worker {self.address} is draining")
        if self.running + self.waiting >= self.capacity:
            raise BatonError(ErrorCode.OVERLOADED, f"{self.waiting} requests already queued", retry_after_s=0.05)
        if self.faults.overloaded_fraction and self._rng.random() < self.faults.overloaded_fraction:
            raise BatonError(ErrorCode.OVERLOADED, "refused by fault injection", retry_after_s=0.05)
        self.admitted += 1
        self._requests[request_id] = asyncio.current_task()
        faults = self.faults
        if faults.die_after_requests and self.admitted >= faults.die_after_requests:
            self._spawn(self.kill())
        if faults.hang_after_requests and self.admitted >= faults.hang_after_requests:
            self.hang()

    async def died(self, context) -> None:
        """In a handler whose task `kill()` cancelled: end the call with UNAVAILABLE (a dead
        peer) instead of CANCELLED (which would read as the client's own abort)."""
        asyncio.current_task().uncancel()
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"simulated worker {self.address} died")

    def forget(self, request_id: str) -> None:
        """The request ended (whatever way)."""
        if self._requests.get(request_id) is asyncio.current_task():
            del self._requests[request_id]

    def abort(self, request_id: str) -> bool:
        """Cancel a running request; True when it was running."""
        task = self._requests.pop(request_id, None)
        if task is None:
            return False
        task.cancel()
        return True

    async def freeze_point(self) -> None:
        """Where a hung worker stops for good."""
        if self.hung:
            await asyncio.Event().wait()

    async def sleep(self, seconds: float) -> None:
        """Model time passing (a hang freezes here too)."""
        await asyncio.sleep(seconds)
        await self.freeze_point()

    async def acquire_slot(self, prompt_tokens: int) -> None:
        """Wait for a running slot (counted as queued meanwhile)."""
        self.waiting += 1
        self.queued_tokens += prompt_tokens
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
            self.queued_tokens -= prompt_tokens
        self.running += 1

    def release_slot(self) -> None:
        self.running -= 1
        self._slots.release()

    async def allocate(self, prompt: list[int], output_tokens: int, deadline: Optional[float]) -> Allocation:
        """KV blocks for the request, waiting (within its deadline) while the pool is full."""
        if self.kv.blocks_for(len(prompt) + output_tokens) > self.kv.num_blocks:
            raise BatonError(ErrorCode.INVALID_REQUEST, f"{len(prompt) + output_tokens} tokens do not fit in "
                             f"{self.kv.num_blocks} blocks of {self.kv.block_size}")
        while True:
            if self.kv.prefill_in_progress(prompt):
                await self._wait_for_prefill(prompt, deadline)
            async with self._room:
                while not self.kv.prefill_in_progress(prompt):
                    allocation = self.kv.acquire(prompt, output_tokens)
                    if allocation is not None:
                        return allocation
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise BatonError(ErrorCode.DEADLINE_EXCEEDED, "no KV room before the deadline")
                    try:
                        await asyncio.wait_for(self._room.wait(), left)
                    except asyncio.TimeoutError:
                        pass

    async def _wait_for_prefill(self, prompt: list[int], deadline: Optional[float]) -> None:
        """Wait (counted as queued) while the next page `prompt` lacks is being prefilled here."""
        self.running -= 1
        self.waiting += 1
        self.queued_tokens += len(prompt)
        try:
            while self.kv.prefill_in_progress(prompt):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise BatonError(ErrorCode.DEADLINE_EXCEEDED, "a prefill of the same prefix outlasted the deadline")
                try:
                    await asyncio.wait_for(self._progress.wait(), left)
                except asyncio.TimeoutError:
                    pass
        finally:
            self.running += 1
            self.waiting -= 1
            self.queued_tokens -= len(prompt)

    def _on_progress(self) -> None:
        """Pages being prefilled were stored or given up: wake the requests waiting for them."""
        self._progress.set()
        self._progress = asyncio.Event()

    async def free(self, allocation: Allocation) -> None:
        self.kv.release(allocation)
        async with self._room:
            self._room.notify_all()

    def observe_ttft(self, seconds: float) -> None:
        self.recent_ttft_s = seconds if not self.recent_ttft_s else (1 - EWMA) * self.recent_ttft_s + EWMA * seconds

    def observe_itl(self, seconds: float) -> None:
        self.recent_itl_s = seconds if not self.recent_itl_s else (1 - EWMA) * self.recent_itl_s + EWMA * seconds

    # --- what the router reads -----------------------------------------------------------------------
    def transfer_peer(self) -> kv_pb2.TransferPeer:
        """A transfer descriptor in the shape of a real worker's (nothing listens on it)."""
        return kv_pb2.TransferPeer(
            worker_id=self.address, epoch=self.epoch, backend=kv_pb2.TCP, metadata=b"sim",
            layout=kv_pb2.KVLayout(num_layers=1, page_size=self.kv.block_size, num_kv_heads=1, head_dim=1,
                                   dtype="sim", num_blocks=self.kv.num_blocks))

    def info(self) -> worker_pb2.WorkerInfo:
        """The Info RPC's answer."""
        kv = self.kv
        load = worker_pb2.WorkerLoad(
            running_requests=self.running, queued_requests=self.waiting, running_tokens=self.running_tokens,
            queued_tokens=self.queued_tokens, kv_usage=kv.used_blocks / kv.num_blocks, prefix_hit_rate=kv.hit_rate,
            prefix_tokens_matched=kv.tokens_matched, prefix_tokens_looked_up=kv.tokens_looked_up,
            max_requests=self.capacity, free_kv_tokens=(kv.free_blocks + kv.evictable_blocks) * kv.block_size,
            recent_ttft_ms=self.recent_ttft_s * 1000, recent_itl_ms=self.recent_itl_s * 1000)
        return worker_pb2.WorkerInfo(role=self.role, worker_id=self.address, model=self.config.sim_model,
                                     epoch=self.epoch, transfer=self.transfer_peer(), load=load, ready=True,
                                     draining=self.server.draining)
