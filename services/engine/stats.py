"""`EngineStats`: one consistent reading of an engine's load and cache figures.

What `Engine.stats()` returns, and what a worker's load report, its metrics and the tests
read instead of reaching into the scheduler, the block pool or the prefix cache.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """Load, KV memory and prefix-cache figures of an engine at one moment."""

    running_requests: int
    """Requests in the running batch."""
    waiting_requests: int
    """Requests in the waiting queue."""
    running_tokens: int
    """Prompt plus generated tokens over the running batch."""
    waiting_tokens: int
    """Prompt plus generated tokens over the waiting queue."""
    reserved_requests: int
    """Decode reservations waiting for their KV hand-off (in neither the batch nor the queue)."""
    reserved_tokens: int
    """Prompt tokens those reservations cover."""
    reserved_blocks: int
    """Blocks held by those reservations (cached prefix blocks they share included)."""
    total_blocks: int
    """Blocks in the KV pool."""
    free_blocks: int
    """Blocks nobody holds."""
    cached_blocks: int
    """Blocks the prefix cache holds (0 with the radix cache disabled)."""
    evictable_blocks: int
    """Cached blocks no request uses, which eviction could free."""
    kv_usage: float
    """Fraction of the pool in use: (total - free - evictable) / total."""
    free_kv_tokens: int
    """Tokens that fit in free plus evictable blocks now."""
    prefix_hit_rate: float
    """Prompt tokens found in the prefix cache / tokens looked up, since start."""
    prefix_tokens_matched: int
    """Tokens found in the prefix cache since start."""
    prefix_tokens_looked_up: int
    """Tokens looked up in the prefix cache since start."""
    preemptions: int
    """Requests preempted (recomputed later) since start."""
