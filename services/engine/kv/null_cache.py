"""The prefix cache used when radix caching is off: the `RadixCache` interface, matching
nothing and caching nothing (mini-sglang's naive cache manager).

Every match is empty (no blocks, the root node), so a request always computes its whole
prompt; `insert` adopts no block, so finished requests' blocks go straight back to the
pool; lock, unlock, evict and reset have nothing to act on. The hit statistics stay at 0
(a disabled cache reports no look-ups), as the engine reported before this class existed.
"""
from __future__ import annotations

from typing import Sequence

from baton.services.engine.kv.block_pool import BlockPool
from baton.services.engine.kv.radix_cache import PrefixMatch, RadixNode


class NullPrefixCache:
    """A `PrefixCache` that holds nothing."""

    def __init__(self, pool: BlockPool, page_size: int) -> None:
        self.pool = pool
        self.page_size = page_size
        self.root = RadixNode()
        self.cached_blocks = 0
        self.locked_blocks = 0
        self.tokens_looked_up = 0
        self.tokens_matched = 0

    @property
    def evictable_blocks(self) -> int:
        """Always 0: nothing is cached."""
        return 0

    @property
    def hit_rate(self) -> float:
        """Always 0.0: nothing is looked up."""
        return 0.0

    def match_prefix(self, tokens: Sequence[int], count: bool = True) -> PrefixMatch:
        """The empty match (no blocks, the root node); counts nothing."""
        return PrefixMatch(blocks=[], node=self.root)

    def insert(self, tokens: Sequence[int], blocks: Sequence[int]) -> int:
        """Adopts no block; returns 0 (no token was cached before)."""
        return 0

    def lock(self, node: RadixNode) -> None:
        """Nothing to protect."""

    def unlock(self, node: RadixNode) -> None:
        """Nothing to release."""

    def evict(self, num_blocks: int) -> int:
        """Nothing to evict: returns 0."""
        return 0

    def reset(self) -> None:
        """Nothing to evict."""

    def check_integrity(self) -> None:
        """Nothing is held, nothing is locked."""
        assert self.cached_blocks == 0 and self.locked_blocks == 0, "the null cache holds blocks"
