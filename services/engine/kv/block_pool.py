"""The KV block allocator: a fixed pool of block ids with reference counts.

Invariants:
- a block is either free (refcount 0, in the free queue exactly once) or held
  (refcount >= 1, not in the free queue);
- holders are requests (their block tables) and the radix cache (its nodes); each holds
  one reference per block and gives it back with `release`;
- blocks are handed out in FIFO order of being freed, so allocation is deterministic.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable


class OutOfBlocks(RuntimeError):
    """Raised when more blocks are requested than are free."""


class BlockPool:
    """Reference-counted block ids 0..num_blocks-1."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks = num_blocks
        self._refcounts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks nobody holds."""
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        """True when n blocks are free now."""
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks, each with refcount 1."""
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refcounts[b] = 1
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """Add one reference to each held block (a new holder)."""
        for b in blocks:
            if self._refcounts[b] < 1:
                raise ValueError(f"block {b} is free; only held blocks can be shared")
            self._refcounts[b] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; a block whose count reaches 0 is free again."""
        for b in blocks:
            if self._refcounts[b] < 1:
                raise ValueError(f"block {b} released more often than held")
            self._refcounts[b] -= 1
            if self._refcounts[b] == 0:
                self._free.append(b)

    def reset(self) -> None:
        """Hand blocks out from id 0 again, as a new pool would (every block must be free)."""
        if len(self._free) != self.num_blocks:
            raise ValueError(f"cannot reset a pool with {self.num_blocks - len(self._free)} blocks held")
        self._free = deque(range(self.num_blocks))

    def refcount(self, block: int) -> int:
        """Current holders of a block."""
        return self._refcounts[block]

    def check_integrity(self) -> None:
        """Raise AssertionError when the free queue and the refcounts disagree."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is in the free queue twice"
        for b, count in enumerate(self._refcounts):
            assert count >= 0, f"block {b} has negative refcount"
            assert (count == 0) == (b in free), f"block {b}: refcount {count} but free={b in free}"
