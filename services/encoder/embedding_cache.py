"""The encoder's embedding cache: image content hash -> embeddings, in transfer-registered blocks.

Entries live in an `EmbeddingArena` (the memory the transfer engine writes from), so a hit
is handed to a worker straight from its blocks. LRU eviction frees unpinned entries until
a new image fits; an entry being written out is pinned. The cache is bounded in bytes
(the arena's size) and counts hits and misses (its hit rate is a metric).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from baton.services.worker.embedding_memory import ArenaFull, EmbeddingArena


@dataclass
class CachedImage:
    """One image's embeddings in the arena."""

    blocks: list[int]
    num_tokens: int
    grid: tuple[int, ...]
    pins: int = 0


class EmbeddingCache:
    """LRU over an arena's blocks."""

    def __init__(self, arena: EmbeddingArena) -> None:
        self.arena = arena
        self._entries: "OrderedDict[str, CachedImage]" = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def hit_rate(self) -> float:
        """Hits / lookups since start (0 before any)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def used_bytes(self) -> int:
        """Bytes held by cached images."""
        with self._lock:
            return sum(len(e.blocks) for e in self._entries.values()) * self.arena.block_bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def lookup(self, content_hash: str) -> Optional[CachedImage]:
        """The pinned entry of a cached image (a hit), or None (a miss); unpin when done."""
        with self._lock:
            entry = self._entries.get(content_hash)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(content_hash)
            entry.pins += 1
            return entry

    def insert(self, content_hash: str, embeddings: torch.Tensor, grid: tuple[int, ...]) -> CachedImage:
        """Cache an image's embeddings (evicting LRU unpinned images for room); returns it pinned.
        ArenaFull when even an empty cache could not hold it."""
        with self._lock:
            entry = self._entries.get(content_hash)
            if entry is not None:  # another request computed it meanwhile
                entry.pins += 1
                return entry
            need = self.arena.blocks_for(embeddings.shape[0])
            while self.arena.num_free < need:
                victim = next((h for h, e in self._entries.items() if e.pins == 0), None)
                if victim is None:
                    raise ArenaFull(f"an image of {embeddings.shape[0]} embeddings does not fit in the embedding "
                                    f"cache ({self.arena.num_blocks} blocks, the rest pinned)")
                self.arena.free(self._entries.pop(victim).blocks)
                self.evictions += 1
            blocks = self.arena.allocate(embeddings.shape[0])
            self.arena.store(blocks, embeddings)
            entry = self._entries[content_hash] = CachedImage(blocks, embeddings.shape[0], tuple(grid), pins=1)
            return entry

    def unpin(self, entry: CachedImage) -> None:
        """Undo one lookup / insert pin."""
        with self._lock:
            entry.pins -= 1
