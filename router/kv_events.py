"""The router's subscriptions to its workers' KV events (`baton.v1.KVEvents.Subscribe`).

`KVEventSubscriber` follows the registry: every known worker gets one task that subscribes
on the worker's channel and keeps the `KVIndex` current. The first batch of a stream is a
snapshot (the worker's whole cache: the index replaces what it knew), so a router started
after warm workers, or a worker that reconnects, is indexed at once; later batches add and
remove blocks, numbered consecutively. When a stream breaks (the worker died, restarted or
cut a subscriber that fell behind) or a batch number is skipped, the worker's blocks are
forgotten and it is re-subscribed with backoff, which brings a fresh snapshot.

Per worker the prefix source is `kv_events` while its stream is live, else `approximate`
(the cache-aware policy's own tree): a worker that does not serve KV events (UNIMPLEMENTED:
an older worker, or one with radix caching off) is asked again only every `retry_unimplemented_s`.
The source of each worker, the index size and its drops, and the index's pending blocks (this
router's dispatches not yet stored, router/kv_index.py) are exported as metrics.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Iterable, Optional

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc
from baton.router.kv_index import KVIndex

log = logging.getLogger(__name__)

EVENTS, APPROXIMATE = "kv_events", "approximate"
"""The two prefix sources a worker can have."""


class KVEventSubscriber:
    """One KV-event stream per registered worker, feeding one index."""

    def __init__(self, registry, index: KVIndex, sync_s: float = 0.25, retry_s: float = 0.2,
                 max_retry_s: float = 1.0, retry_unimplemented_s: float = 30.0) -> None:
        self.registry = registry
        self.index = index
        self.sync_s = sync_s
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.retry_unimplemented_s = retry_unimplemented_s
        self.sources: dict[str, str] = {}
        """Worker address -> EVENTS or APPROXIMATE."""
        self.batches = 0
        """Event batches applied since start."""
        self._decided: set[str] = set()
        self._tasks: dict[str, tuple[asyncio.Task, grpc.aio.Channel]] = {}
        self._loop_task: Optional[asyncio.Task] = None
        self._changed = asyncio.Event()

    def source(self, address: str) -> str:
        """Where the prefix scores of `address` come from now."""
        return self.sources.get(address, APPROXIMATE)

    # --- life ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Follow the registry's workers (subscribing at once to those known now)."""
        self.sync()
        self._loop_task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Cancel every subscription."""
        tasks = [t for t in [self._loop_task, *(task for task, _ in self._tasks.values())] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def wait_ready(self, timeout: float) -> None:
        """Wait until every registered worker's source is decided (a snapshot arrived, or it
        has no events / cannot be reached), at most `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not set(self.registry.workers) <= self._decided:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.sync_s)
            self.sync()

    def sync(self) -> None:
        """Subscribe to new workers; drop those that left the registry (or were re-added with a new channel)."""
        workers = self.registry.workers
        for address in [a for a, (_, channel) in self._tasks.items()
                        if a not in workers or workers[a].channel is not channel]:  # gone, or re-added
            self._tasks.pop(address)[0].cancel()
            self._fall_back(address, decided=False)
            self.sources.pop(address, None)
        for address, entry in workers.items():
            if address not in self._tasks:
                self._tasks[address] = (asyncio.create_task(self._follow(address, entry.channel)), entry.channel)

    # --- one worker ----------------------------------------------------------------------------------
    async def _follow(self, address: str, channel: grpc.aio.Channel) -> None:
        backoff = self.retry_s
        while True:
            try:
                await self._stream(address, channel)
                why = "stream ended"
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._fall_back(address)
                    log.info("worker %s publishes no KV events: approximate prefix scores", address)
                    await asyncio.sleep(self.retry_unimplemented_s)
                    continue
                why = f"{error.code().name}: {error.details()}"
            except _Gap as gap:
                why = str(gap)
            if self.sources.get(address) == EVENTS:
                log.info("KV events of %s lost (%s); re-subscribing", address, why)
                backoff = self.retry_s
            self._fall_back(address)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_retry_s)

    async def _stream(self, address: str, channel: grpc.aio.Channel) -> None:
        call = worker_pb2_grpc.KVEventsStub(channel).Subscribe(worker_pb2.KVEventsRequest())
        expected = None
        try:
            async for batch in call:
                if batch.snapshot:
                    self.index.replace(address, batch.block_size, _stored_hashes(batch.events))
                    expected = batch.sequence + 1
                    self.sources[address] = EVENTS
                    self._decide(address)
                    continue
                if expected is None or batch.sequence != expected:
                    raise _Gap(f"batch {batch.sequence} after {None if expected is None else expected - 1}")
                expected += 1
                self.apply(address, batch)
        finally:
            call.cancel()

    def apply(self, address: str, batch: worker_pb2.KVEventBatch) -> None:
        """Apply one (non-snapshot) batch of `address`'s events to the index."""
        index = self.index
        for event in batch.events:
            kind = event.WhichOneof("kind")
            if kind == "stored":
                index.stored(address, event.stored.block_hashes)
            elif kind == "removed":
                index.removed(address, event.removed.block_hashes)
            elif kind == "cleared":
                index.cleared(address)
        self.batches += 1

    def _fall_back(self, address: str, decided: bool = True) -> None:
        self.index.forget(address)
        self.sources[address] = APPROXIMATE
        if decided:
            self._decide(address)

    def _decide(self, address: str) -> None:
        self._decided.add(address)
        self._changed.set()


class _Gap(Exception):
    """A batch number was skipped: the index may have missed events."""


def _stored_hashes(events: Iterable[worker_pb2.KVEvent]) -> list[int]:
    return [h for e in events if e.WhichOneof("kind") == "stored" for h in e.stored.block_hashes]


class KVIndexCollector:
    """Prometheus collector: the index size and drops, and each worker's prefix source."""

    def __init__(self, subscriber: KVEventSubscriber) -> None:
        self.subscriber = subscriber

    def collect(self):
        sub, index = self.subscriber, self.subscriber.index
        entries = GaugeMetricFamily("baton_router_kv_index_entries",
                                    "(block, worker) pairs in the KV-event index (bounded by --kv-index-max-entries)")
        entries.add_metric([], index.entries)
        blocks = GaugeMetricFamily("baton_router_kv_index_blocks", "Distinct KV block hashes in the KV-event index")
        blocks.add_metric([], index.num_blocks)
        dropped = CounterMetricFamily("baton_router_kv_index_dropped", "Index pairs dropped to stay within its bound")
        dropped.add_metric([], index.dropped)
        pending = GaugeMetricFamily("baton_router_kv_index_pending_entries",
                                    "(block, worker) pairs this router dispatched that the worker's KV events have not "
                                    "stored yet (scored as cached; bounded by --kv-pending-max-entries)")
        pending.add_metric([], index.pending_entries)
        outcome = CounterMetricFamily("baton_router_kv_index_pending", "Pending pairs ended: confirmed by a stored "
                                      "event, or expired (or dropped at the bound) without one", labels=["outcome"])
        outcome.add_metric(["confirmed"], index.pending_confirmed)
        outcome.add_metric(["expired"], index.pending_expired)
        source = GaugeMetricFamily("baton_router_prefix_source",
                                   "1 for the source of a worker's prefix scores: kv_events or approximate",
                                   labels=["worker", "source"])
        for address in list(sub.registry.workers):
            source.add_metric([address, sub.source(address)], 1)
        return [entries, blocks, dropped, pending, outcome, source]
