"""A worker's KV events: the publisher behind `baton.v1.KVEvents.Subscribe`.

`KVEventPublisher` is the prefix cache's event sink (services/engine/kv/kv_events.py): it
turns the token pages a cache reports into chain hashes (baton/protos/block_hash.py), keeps
a mirror of every cached block hash (so a new subscriber gets a snapshot without touching
the engine), and fans batches of events out to subscribers. The real engine's radix cache
calls it from the engine thread (`stored` / `removed` / `cleared`); the simulated worker
(services/sim) names blocks by hash itself (`stored_hashes` / `removed_hashes`).

Ordering: changes are applied to the mirror and queued under one lock; a flush on the
event loop (scheduled thread-safely once per burst) numbers them as one batch. A
subscriber's snapshot is taken under the same lock, so it includes every change before it;
changes still queued at that moment are sent again in the next batch, which is harmless:
each event sets a block's presence, so replaying events already in a snapshot leaves it
unchanged. A subscriber that falls `max_queued_batches` behind is cut off (the stream ends
with RESOURCE_EXHAUSTED) and re-subscribes for a fresh snapshot: memory stays bounded.
"""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Optional, Sequence

import grpc

from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc
from baton.protos.block_hash import ROOT_HASH, block_hashes

SNAPSHOT_CHUNK = 65536
"""Block hashes per stored event in a snapshot (keeps each event well under gRPC's limits)."""


_END = object()
"""Queued to every subscriber when the publisher closes: its stream ends."""


class _Subscriber:
    def __init__(self, limit: int) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.limit = limit
        self.lost = False


class KVEventPublisher:
    """Mirror of a worker's cached block hashes, and the fan-out of their changes."""

    def __init__(self, block_size: int, loop: asyncio.AbstractEventLoop, worker_id: str = "", epoch: int = 0,
                 max_queued_batches: int = 4096) -> None:
        self.block_size = block_size
        self.worker_id = worker_id
        self.epoch = epoch
        self.sequence = 0
        """Number of the last batch sent."""
        self.max_queued_batches = max_queued_batches
        self._loop = loop
        self._lock = threading.Lock()
        self._blocks: dict[int, None] = {}
        self._pending: list[worker_pb2.KVEvent] = []
        self._scheduled = False
        self._subscribers: set[_Subscriber] = set()
        self.closed = False

    @property
    def num_blocks(self) -> int:
        """Block hashes cached now, as far as the publisher was told."""
        return len(self._blocks)

    def block_set(self) -> set[int]:
        """A copy of the cached block hashes."""
        with self._lock:
            return set(self._blocks)

    # --- the engine's sink (token pages; any thread) --------------------------------------------
    def stored(self, prefix: Sequence[int], tokens: Sequence[int]) -> None:
        parent = block_hashes(prefix, self.block_size)[-1] if len(prefix) >= self.block_size else ROOT_HASH
        self.stored_hashes(parent, block_hashes(tokens, self.block_size, parent))

    def removed(self, prefix: Sequence[int], tokens: Sequence[int]) -> None:
        parent = block_hashes(prefix, self.block_size)[-1] if len(prefix) >= self.block_size else ROOT_HASH
        self.removed_hashes(block_hashes(tokens, self.block_size, parent))

    def cleared(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._queue(worker_pb2.KVEvent(cleared=worker_pb2.KVAllCleared()))

    # --- by hash (the simulated worker) ---------------------------------------------------------
    def stored_hashes(self, parent: int, hashes: Sequence[int]) -> None:
        """Consecutive blocks after `parent` are cached now."""
        if not hashes:
            return
        with self._lock:
            for h in hashes:
                self._blocks[h] = None
            self._queue(worker_pb2.KVEvent(stored=worker_pb2.KVBlocksStored(
                block_hashes=hashes, parent_block_hash=parent)))

    def removed_hashes(self, hashes: Sequence[int]) -> None:
        """These blocks were evicted."""
        if not hashes:
            return
        with self._lock:
            for h in hashes:
                self._blocks.pop(h, None)
            self._queue(worker_pb2.KVEvent(removed=worker_pb2.KVBlocksRemoved(block_hashes=hashes)))

    def _queue(self, event: worker_pb2.KVEvent) -> None:
        """Under the lock: queue one event and make sure a flush is coming."""
        if not self._subscribers:
            return  # the mirror is enough for a later subscriber's snapshot
        self._pending.append(event)
        if not self._scheduled:
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the loop is closed: the process is stopping
                self._scheduled = False

    def _flush(self) -> None:
        with self._lock:
            events, self._pending, self._scheduled = self._pending, [], False
            if not events:
                return
            self.sequence += 1
            batch = worker_pb2.KVEventBatch(worker_id=self.worker_id, epoch=self.epoch, sequence=self.sequence,
                                            block_size=self.block_size, events=events)
            for sub in self._subscribers:
                if sub.lost:
                    continue
                if sub.queue.qsize() >= sub.limit:
                    sub.lost = True
                    sub.queue.put_nowait(None)
                else:
                    sub.queue.put_nowait(batch)

    # --- subscribers (event loop) -----------------------------------------------------------------
    def snapshot_batch(self) -> worker_pb2.KVEventBatch:
        """The whole mirror as one snapshot batch (numbered with the last batch sent)."""
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> worker_pb2.KVEventBatch:
        hashes = list(self._blocks)
        events = [worker_pb2.KVEvent(stored=worker_pb2.KVBlocksStored(block_hashes=hashes[i:i + SNAPSHOT_CHUNK]))
                  for i in range(0, len(hashes), SNAPSHOT_CHUNK)]
        return worker_pb2.KVEventBatch(worker_id=self.worker_id, epoch=self.epoch, sequence=self.sequence,
                                       block_size=self.block_size, snapshot=True, events=events)

    def close(self) -> None:
        """End every subscription (the server is stopping: a stopping gRPC server would
        otherwise wait out its whole grace period for these never-ending streams)."""
        with self._lock:
            self.closed = True
            subscribers = list(self._subscribers)
        for sub in subscribers:
            self._loop.call_soon_threadsafe(sub.queue.put_nowait, _END)

    async def subscribe(self) -> AsyncIterator[Optional[worker_pb2.KVEventBatch]]:
        """The snapshot, then every later batch; yields None when this subscriber fell too far
        behind (the caller ends the stream); ends when the publisher closes."""
        sub = _Subscriber(self.max_queued_batches)
        with self._lock:
            if self.closed:
                return
            snapshot = self._snapshot_locked()
            self._subscribers.add(sub)
        try:
            yield snapshot
            while True:
                batch = await sub.queue.get()
                if batch is _END:
                    return
                yield batch
                if batch is None:
                    return
        finally:
            with self._lock:
                self._subscribers.discard(sub)


class KVEventsServicer(worker_pb2_grpc.KVEventsServicer):
    """`baton.v1.KVEvents`: streams a publisher's snapshot and batches to each subscriber."""

    def __init__(self, publisher: KVEventPublisher) -> None:
        self.publisher = publisher

    async def Subscribe(self, request: worker_pb2.KVEventsRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.KVEventBatch]:
        async for batch in self.publisher.subscribe():
            if batch is None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    "KV-event subscriber fell behind; subscribe again for a snapshot")
            yield batch


def attach_to_engine(engine, publisher: KVEventPublisher) -> bool:
    """Make `publisher` the sink of the engine's prefix cache; False when the engine has no
    radix cache (radix caching disabled: nothing is ever cached, nothing to publish)."""
    cache = getattr(engine, "cache", None)
    if cache is None or not hasattr(cache, "events"):
        return False
    with publisher._lock:
        publisher._blocks.clear()
    cache.events = publisher
    return True
