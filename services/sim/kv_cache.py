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
Every page entering or leaving the cache goes to the `KVEventPublisher` (when one is set),
so the router's index mirrors exactly what `cached_hashes()` returns.

Invariant (`check_integrity`): cached + uncached-held blocks <= num_blocks; every evictable
block is cached with refcount 0.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

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
        return Allocation(hashes=hashes, held=list(hashes[:hit]), uncached=need, cached_tokens=hit * self.block_size)

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

    def release(self, allocation: Allocation) -> None:
        """Drop every reference the request holds (its cached blocks become evictable)."""
        for h in reversed(allocation.held):
            self._refs[h] -= 1
            if self._refs[h] == 0:
                self._evictable[h] = None
        self._uncached -= allocation.uncached
        allocation.held, allocation.uncached = [], 0

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
