"""A simulated worker's KV memory: a pool of N blocks and a prefix cache over block hashes.

Blocks are named by their chain hash (baton/protos/block_hash.py), as vLLM's prefix cache
names them, so a cached block stands for a whole prefix and a prompt's cached part is the
run of its page hashes found in the cache, from the start. The cache is real: prompts that
share a prefix hit, and a full pool evicts.

- A request `acquire`s blocks for its prompt and output: the cached pages of its prompt are
  shared (their refcount goes up, so they cannot be evicted while it runs); the rest are
  new, uncached blocks, taken from the free ones and, when there are too few, by evicting
  cached blocks nobody uses, least recently released first.
- `store` caches the whole pages it has computed (after prefill: the prompt; at the end: the
  output too). A page someone else cached meanwhile is shared instead and its block freed.
- `release` drops the request's references; its cached blocks become evictable, deepest
  first (a sequence's last block is evicted before the blocks its prefix needs).
- Between `acquire` and `store`, the uncached pages of a request's prompt are *being computed*
  (its prefill runs): `prefill_in_progress(prompt)` says whether the next page another prompt
  lacks is one of them, so that request can wait for it and hit, as a real engine's scheduler
  matches its radix cache when it schedules a waiting request (services/sim/worker.py waits).
  `on_progress` (when set) is called whenever such pages are stored or given up.
Every page entering or leaving the cache goes to the `KVEventPublisher` (when one is set),
so the router's index mirrors exactly what `cached_hashes()` returns.

Invariant (`check_integrity`): cached + uncached-held blocks <= num_blocks; every evictable
block is cached with refcount 0.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from baton.protos.block_hash import ROOT_HASH, block_hashes


@dataclass
class Allocation:
    """The blocks one request holds."""

    hashes: list[int]
    """Chain hashes of the prompt's whole pages."""
    held: list[int] = field(default_factory=list)
    """Cached blocks this request holds a reference on, in sequence order."""
    uncached: int = 0
    """Blocks held that are not (yet) cached."""
    cached_tokens: int = 0
    """Prompt tokens found in the cache at acquire time."""
    computing: int = 0
    """`hashes[computing:computing_end]` are the prompt pages this request is computing now."""
    computing_end: int = 0
    """End of the prompt pages it computes (`len(hashes)`)."""


class SimKVCache:
    """Refcounted blocks named by chain hash, with LRU eviction of unused cached blocks."""

    def __init__(self, num_blocks: int, block_size: int, publisher=None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.publisher = publisher
        self._refs: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._uncached = 0
        self.tokens_looked_up = 0
        self.tokens_matched = 0
        self.evicted_blocks = 0
        self._computing: dict[int, int] = {}
        """Page hash -> requests computing it now (acquired, not stored yet)."""
        self.on_progress: Optional[Callable[[], None]] = None
        """Called when pages being computed are stored or given up (a waiter may now hit)."""

    # --- figures -----------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        """Blocks nobody holds and nothing is cached in."""
        return self.num_blocks - len(self._refs) - self._uncached

    @property
    def evictable_blocks(self) -> int:
        """Cached blocks no request uses."""
        return len(self._evictable)

    @property
    def used_blocks(self) -> int:
        """Blocks requests hold now (cached prefixes nobody uses excluded)."""
        return self.num_blocks - self.free_blocks - self.evictable_blocks

    @property
    def hit_rate(self) -> float:
        """Prompt tokens found cached / prompt tokens looked up."""
        return self.tokens_matched / self.tokens_looked_up if self.tokens_looked_up else 0.0

    def cached_hashes(self) -> set[int]:
        """Every block hash cached now."""
        return set(self._refs)

    def blocks_for(self, tokens: int) -> int:
        """Blocks needed to hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    def matched_tokens(self, tokens: Sequence[int]) -> int:
        """Cached prefix of `tokens`, in tokens (pure: no reference taken, no statistics)."""
        matched = 0
        for h in block_hashes(tokens, self.block_size):
            if h not in self._refs:
                break
            matched += 1
        return matched * self.block_size

    def prefill_in_progress(self, prompt: Sequence[int]) -> bool:
        """True when the first page of `prompt` that is not cached is being computed by a
        request's prefill now (waiting for it turns it into a hit)."""
        if not self._computing:
            return False
        for h in block_hashes(prompt, self.block_size):
            if h not in self._refs:
                return h in self._computing
        return False

    # --- a request's blocks ------------------------------------------------------------------------
    def acquire(self, prompt: Sequence[int], output_tokens: int) -> Optional[Allocation]:
        """Hold the cached pages of `prompt` and enough new blocks for the rest of it and
        `output_tokens` more; None (nothing held) when the pool cannot make room now."""
        hashes = block_hashes(prompt, self.block_size)
        hit = 0
        while hit < len(hashes) and hashes[hit] in self._refs:
            hit += 1
        need = self.blocks_for(len(prompt) + output_tokens) - hit
        reusable = sum(1 for h in hashes[:hit] if h in self._evictable)
        if need > self.free_blocks + self.evictable_blocks - reusable:
            return None
        for h in hashes[:hit]:
            self._take(h)
        removed = []
        while self.free_blocks < need:
            victim, _ = self._evictable.popitem(last=False)
            del self._refs[victim]
            removed.append(victim)
        self.evicted_blocks += len(removed)
        if removed and self.publisher is not None:
            self.publisher.removed_hashes(removed)
        self._uncached += need
        self.tokens_looked_up += len(prompt)
        self.tokens_matched += hit * self.block_size
        computing = self._computing
        for h in hashes[hit:]:
            computing[h] = computing.get(h, 0) + 1
        return Allocation(hashes=hashes, held=list(hashes[:hit]), uncached=need, cached_tokens=hit * self.block_size,
                          computing=hit, computing_end=len(hashes))

    def store(self, allocation: Allocation, tokens: Sequence[int]) -> None:
        """Cache the whole pages of `tokens` (the request's context so far) it has not cached yet."""
        start = len(allocation.held)
        parent = allocation.held[-1] if allocation.held else ROOT_HASH
        pages = block_hashes(tokens[start * self.block_size:], self.block_size, parent)
        pages = pages[:allocation.uncached]
        new: list[int] = []
        for h in pages:
            allocation.uncached -= 1
            self._uncached -= 1
            if h in self._refs:  # cached meanwhile by another request: share it, free ours
                self._take(h)
            else:
                self._refs[h] = 1
                new.append(h)
            allocation.held.append(h)
        if new and self.publisher is not None:
            first = allocation.held.index(new[0])
            self.publisher.stored_hashes(allocation.held[first - 1] if first else ROOT_HASH, new)
        self._computed(allocation, min(len(allocation.held), allocation.computing_end))

    def release(self, allocation: Allocation) -> None:
        """Drop every reference the request holds (its cached blocks become evictable)."""
        for h in reversed(allocation.held):
            self._refs[h] -= 1
            if self._refs[h] == 0:
                self._evictable[h] = None
        self._uncached -= allocation.uncached
        allocation.held, allocation.uncached = [], 0
        self._computed(allocation, allocation.computing_end)

    def _computed(self, allocation: Allocation, upto: int) -> None:
        """The request no longer computes its prompt pages before `upto` (stored or given up)."""
        if upto <= allocation.computing:
            return
        computing = self._computing
        for h in allocation.hashes[allocation.computing:upto]:
            left = computing[h] - 1
            if left:
                computing[h] = left
            else:
                del computing[h]
        allocation.computing = upto
        if self.on_progress is not None:
            self.on_progress()

    def _take(self, h: int) -> None:
        self._refs[h] += 1
        self._evictable.pop(h, None)

    def check_integrity(self) -> None:
        """Raise AssertionError when the module's invariant does not hold."""
        assert len(self._refs) + self._uncached <= self.num_blocks, "more blocks held than exist"
        assert self._uncached >= 0
        for h in self._evictable:
            assert self._refs.get(h) == 0, f"evictable block {h} is in use"
        assert sum(1 for c in self._refs.values() if c == 0) == len(self._evictable)
        assert all(c > 0 for c in self._computing.values())
