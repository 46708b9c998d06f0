"""The router's index of which worker holds which KV block, fed by the workers' KV events.

Blocks are named by chain hash (baton/protos/block_hash.py), so a prompt is looked up by
hashing its pages: a worker's cached prefix is the run of the prompt's block hashes it
holds, from the first page on (what its own prefix cache would match). The index is what
the precise cache-aware policy scores with (router/policies/cache_aware.py); it is filled by
router/kv_events.py: a snapshot replaces a worker's blocks, later events add and remove.

Memory is bounded: at most `max_entries` (block, worker) pairs. Block hashes are kept in
least-recently-used order (storing or matching a block refreshes it); past the bound the
least recently used block is dropped for every worker that held it. A dropped block only
shortens matches (the policy may underestimate a prefix), never invents one.

A worker is *tracked* once a snapshot of it arrived (its block size is known) and until it
is forgotten (its stream broke or it left): only tracked workers are scored from the index;
the others fall back to the policy's approximate tree.

Pending blocks: a worker stores a prompt's pages only once its prefill is done, so for the
length of a prefill the events say nobody holds a prefix that one worker is computing. The
router records the pages of each prompt it dispatches to a tracked worker (`dispatched`) as
*pending* there until that worker's events store them (or remove them, clear or forget the
worker), or `pending_ttl_s` passes (the request failed, or went elsewhere). Matches count
pending pages like held ones, so the next prompt with that prefix goes to the worker already
computing it (which, like a real engine's scheduler, matches its cache when it schedules the
request). At most `max_pending` pending (block, worker) pairs, oldest dropped first; they are
counted apart (`pending_entries`, `pending_expired`, `pending_confirmed`), never in `entries`.
A replica knows only its own dispatches: pending pages are per router.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

from baton.protos.block_hash import ROOT_HASH, next_block_hash


class KVIndex:
    """Block hash -> the workers holding it, LRU-bounded."""

    def __init__(self, max_entries: int = 1_000_000, pending_ttl_s: float = 5.0, max_pending: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if pending_ttl_s < 0 or max_pending < 0:
            raise ValueError(f"pending_ttl_s and max_pending must be >= 0, got {pending_ttl_s}, {max_pending}")
        self.max_entries = max_entries
        self.pending_ttl_s = pending_ttl_s
        """Seconds a dispatched page counts as pending on its worker without a stored event (0: off)."""
        self.max_pending = max_pending
        self._clock = clock
        self._pending: OrderedDict[tuple[str, int], float] = OrderedDict()
        """(worker, block hash) -> expiry time, oldest first."""
        self._pending_holders: dict[int, set[str]] = {}
        self._pending_of: dict[str, set[int]] = {}
        self.pending_expired = 0
        """Pending pairs that expired, or were dropped at `max_pending`, with no stored event."""
        self.pending_confirmed = 0
        """Pending pairs a stored event confirmed."""
        self._memo: tuple = ()
        self._holders: OrderedDict[int, set[str]] = OrderedDict()
        self._by_worker: dict[str, set[int]] = {}
        self._block_size: dict[str, int] = {}
        self.entries = 0
        """(block, worker) pairs held now."""
        self.dropped = 0
        """Pairs dropped to stay within `max_entries` since start."""

    # --- what is known -------------------------------------------------------------------------------
    def tracks(self, worker: str) -> bool:
        """True when the worker's blocks are known from its events."""
        return worker in self._block_size

    def block_size(self, worker: str) -> int:
        """Tokens per block of a tracked worker (0 when untracked)."""
        return self._block_size.get(worker, 0)

    def blocks_of(self, worker: str) -> set[int]:
        """A copy of the block hashes the index says `worker` holds."""
        return set(self._by_worker.get(worker, ()))

    def cached_tokens(self, worker: str) -> int:
        """Tokens the index says `worker` holds in all."""
        return len(self._by_worker.get(worker, ())) * self._block_size.get(worker, 0)

    @property
    def num_blocks(self) -> int:
        """Distinct block hashes held."""
        return len(self._holders)

    @property
    def pending_entries(self) -> int:
        """Pending (block, worker) pairs now (apart from `entries`)."""
        return len(self._pending)

    def pending_blocks(self, worker: str) -> int:
        """Blocks this router dispatched to `worker` that its events have not stored yet."""
        self._expire()
        return len(self._pending_of.get(worker, ()))

    # --- updates (router/kv_events.py) -------------------------------------------------------------
    def replace(self, worker: str, block_size: int, hashes: Iterable[int]) -> None:
        """A snapshot: `worker` holds exactly `hashes` (blocks of `block_size` tokens)."""
        self.forget(worker)
        self._block_size[worker] = block_size
        self._by_worker[worker] = set()
        self.stored(worker, hashes)

    def stored(self, worker: str, hashes: Iterable[int]) -> None:
        """`worker` cached these blocks."""
        mine = self._by_worker.setdefault(worker, set())
        holders_of = self._holders
        pending = self._pending_of.get(worker)
        for h in hashes:
            if pending and h in pending:
                self._drop_pending(worker, h)
                self.pending_confirmed += 1
            holders = holders_of.get(h)
            if holders is None:
                holders = holders_of[h] = set()
            else:
                holders_of.move_to_end(h)
            if worker not in holders:
                holders.add(worker)
                mine.add(h)
                self.entries += 1
        self._bound()

    def removed(self, worker: str, hashes: Iterable[int]) -> None:
        """`worker` evicted these blocks."""
        mine = self._by_worker.get(worker)
        if mine is None:
            return
        pending = self._pending_of.get(worker)
        for h in hashes:
            if h in mine:
                mine.discard(h)
                self._drop_pair(h, worker)
            if pending and h in pending:
                self._drop_pending(worker, h)

    def cleared(self, worker: str) -> None:
        """`worker` holds nothing any more (it stays tracked)."""
        for h in self._by_worker.get(worker, set()):
            self._drop_pair(h, worker)
        if worker in self._by_worker:
            self._by_worker[worker] = set()
        for h in list(self._pending_of.get(worker, ())):
            self._drop_pending(worker, h)

    def forget(self, worker: str) -> None:
        """Stop tracking `worker` and drop its blocks."""
        self.cleared(worker)
        self._by_worker.pop(worker, None)
        self._block_size.pop(worker, None)

    def _drop_pair(self, h: int, worker: str) -> None:
        holders = self._holders.get(h)
        if holders is not None and worker in holders:
            holders.discard(worker)
            self.entries -= 1
            if not holders:
                del self._holders[h]

    def _bound(self) -> None:
        while self.entries > self.max_entries:
            h, holders = self._holders.popitem(last=False)
            for worker in holders:
                self._by_worker[worker].discard(h)
            self.entries -= len(holders)
            self.dropped += len(holders)

    # --- pending blocks (this router's dispatches) ------------------------------------------------------
    def dispatched(self, worker: str, tokens: Sequence[int]) -> None:
        """This router sent a prompt of `tokens` to `worker`: its whole pages the worker does not
        hold are pending there (a no-op for an untracked worker or with `pending_ttl_s` 0)."""
        size = self._block_size.get(worker)
        if not size or not self.pending_ttl_s or not self.max_pending:
            return
        now = self._clock()
        self._expire(now)
        expiry = now + self.pending_ttl_s
        mine = self._by_worker.get(worker, set())
        pending, holders_of = self._pending, self._pending_holders
        pending_of = self._pending_of.setdefault(worker, set())
        for h in self._hashes(tokens, size, len(tokens) // size):  # every whole page: the memo holds no more
            if h in mine:
                continue
            key = (worker, h)
            if key in pending:
                pending.move_to_end(key)
            else:
                holders_of.setdefault(h, set()).add(worker)
                pending_of.add(h)
            pending[key] = expiry
        while len(pending) > self.max_pending:
            (old_worker, h), _ = pending.popitem(last=False)
            self._unlink_pending(old_worker, h)
            self.pending_expired += 1

    def _expire(self, now: float | None = None) -> None:
        pending = self._pending
        if not pending:
            return
        now = self._clock() if now is None else now
        while pending:
            key, expiry = next(iter(pending.items()))
            if expiry > now:
                return
            del pending[key]
            self._unlink_pending(*key)
            self.pending_expired += 1

    def _drop_pending(self, worker: str, h: int) -> None:
        if self._pending.pop((worker, h), None) is not None:
            self._unlink_pending(worker, h)

    def _unlink_pending(self, worker: str, h: int) -> None:
        holders = self._pending_holders.get(h)
        if holders is not None:
            holders.discard(worker)
            if not holders:
                del self._pending_holders[h]
        mine = self._pending_of.get(worker)
        if mine is not None:
            mine.discard(h)
            if not mine:
                del self._pending_of[worker]

    def _hashes(self, tokens: Sequence[int], size: int, count: int) -> list[int]:
        """The page hashes of `tokens`, at least its first `count` (a one-prompt memo: select,
        the decider's estimate and dispatch hash the same prompt list)."""
        memo = self._memo
        if memo and memo[0] is tokens and memo[1] == size and memo[2] == len(tokens):
            hashes = memo[3]
        else:
            hashes = []
            self._memo = (tokens, size, len(tokens), hashes)
        if len(hashes) < count:
            h = hashes[-1] if hashes else ROOT_HASH
            for start in range(len(hashes) * size, count * size, size):
                h = next_block_hash(h, tokens[start:start + size])
                hashes.append(h)
        return hashes

    # --- scoring -----------------------------------------------------------------------------------
    def matched_tokens(self, tokens: Sequence[int], workers: Iterable[str]) -> dict[str, int]:
        """For each worker, the tokens of the longest prefix of `tokens` whose every block it
        holds or has pending (0 for untracked workers). Matched blocks count as used (LRU)."""
        self._expire()
        result: dict[str, int] = {}
        by_size: dict[int, list[str]] = {}
        for worker in workers:
            result[worker] = 0
            size = self._block_size.get(worker)
            if size:
                by_size.setdefault(size, []).append(worker)
        holders_of, pending_of = self._holders, self._pending_holders
        for size, group in by_size.items():
            alive, depth, pages, hashes = set(group), 0, len(tokens) // size, ()
            while depth < pages:
                if depth >= len(hashes):  # hash as far as the match may go, a few pages at a time
                    hashes = self._hashes(tokens, size, min(pages, depth + 8))
                h = hashes[depth]
                holders, pending = holders_of.get(h), pending_of.get(h)
                if holders is None:
                    if pending is None:
                        break
                    holders = pending
                else:
                    holders_of.move_to_end(h)
                    if pending is not None:
                        holders = holders | pending
                still = alive & holders
                for worker in alive - still:
                    result[worker] = depth * size
                alive = still
                depth += 1
                if not alive:
                    break
            for worker in alive:
                result[worker] = depth * size
        return result
