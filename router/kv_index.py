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
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

from baton.protos.block_hash import ROOT_HASH, next_block_hash


class KVIndex:
    """Block hash -> the workers holding it, LRU-bounded."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
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
        for h in hashes:
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
        for h in hashes:
            if h in mine:
                mine.discard(h)
                self._drop_pair(h, worker)

    def cleared(self, worker: str) -> None:
        """`worker` holds nothing any more (it stays tracked)."""
        for h in self._by_worker.get(worker, set()):
            self._drop_pair(h, worker)
        if worker in self._by_worker:
            self._by_worker[worker] = set()

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

    # --- scoring -----------------------------------------------------------------------------------
    def matched_tokens(self, tokens: Sequence[int], workers: Iterable[str]) -> dict[str, int]:
        """For each worker, the tokens of the longest prefix of `tokens` whose every block it
        holds (0 for untracked workers). Matched blocks count as used (LRU)."""
        result: dict[str, int] = {}
        by_size: dict[int, list[str]] = {}
        for worker in workers:
            result[worker] = 0
            size = self._block_size.get(worker)
            if size:
                by_size.setdefault(size, []).append(worker)
        holders_of = self._holders
        for size, group in by_size.items():
            alive, depth, h = set(group), 0, ROOT_HASH
            for start in range(0, len(tokens) - size + 1, size):
                h = next_block_hash(h, tokens[start:start + size])
                holders = holders_of.get(h)
                if holders is None:
                    break
                holders_of.move_to_end(h)
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
