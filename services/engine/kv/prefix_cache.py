"""The prefix-cache interface the scheduler and the engine program against.

Two implementations: `RadixCache` (radix_cache.py: the page-aligned radix tree, with
LRU eviction and hit statistics) and `NullPrefixCache` (null_cache.py: matches nothing,
caches nothing; used when `disable_radix_cache` is set). Callers never test which one they
hold: every branch on "is there a prefix cache" lives in the choice of implementation.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from baton.services.engine.kv.radix_cache import PrefixMatch, RadixNode


class PrefixCache(Protocol):
    """What a prefix cache over a `BlockPool` offers (see `RadixCache` for the semantics)."""

    page_size: int
    cached_blocks: int
    """Blocks the cache holds a pool reference on."""
    locked_blocks: int
    """Cached blocks in use by a request (never evicted)."""
    tokens_looked_up: int
    """Tokens looked up by counted matches since start."""
    tokens_matched: int
    """Tokens those matches found cached."""

    @property
    def evictable_blocks(self) -> int:
        """Blocks that eviction could return to the pool."""

    @property
    def hit_rate(self) -> float:
        """Tokens matched / tokens looked up (0 when nothing was looked up)."""

    def match_prefix(self, tokens: Sequence[int], count: bool = True) -> PrefixMatch:
        """Longest cached whole-page prefix of `tokens`."""

    def insert(self, tokens: Sequence[int], blocks: Sequence[int]) -> int:
        """Cache the whole pages of `tokens` held in `blocks`; returns tokens already cached."""

    def lock(self, node: RadixNode) -> None:
        """Protect a matched node from eviction while a request uses it."""

    def unlock(self, node: RadixNode) -> None:
        """Undo one `lock(node)`."""

    def evict(self, num_blocks: int) -> int:
        """Free at least `num_blocks` blocks if possible; returns blocks evicted."""

    def reset(self) -> None:
        """Evict everything (nothing may be locked)."""

    def check_integrity(self) -> None:
        """Raise AssertionError when an invariant does not hold."""
