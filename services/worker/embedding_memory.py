"""Image embeddings as transfer-engine memory: a block arena the encoder caches in and workers land in.

The wire describes a peer's memory as a KV-cache layout (`baton.v1.KVLayout`), so the
embedding memory takes that form: one "layer" whose K tensor holds the first half of each
embedding's width and whose V tensor holds the second half, `tokens_per_block` embeddings
a block (page_size = tokens_per_block, num_kv_heads = 1, head_dim = hidden / 2). Two peers
handshake only when tokens per block, width and dtype agree, and a transfer moves whole
blocks of both halves: an image of n embeddings is ceil(n / tokens_per_block) blocks, the
last one partly used.

`EmbeddingArena` owns the tensors, a free list of blocks, and the copies in (`store`) and
out (`load`). The encoder's embedding cache keeps images in its arena's blocks and writes
them into a worker's landing arena through the transfer engine; the worker reads them out
and frees its blocks.
"""
from __future__ import annotations

import threading

import torch

from baton.services.transfer.memory import MemoryRegion, RegisteredMemory, kv_region_layout

DEFAULT_TOKENS_PER_BLOCK = 16
"""Embeddings per arena block (the encoder and its workers must agree; the handshake checks it)."""


class ArenaFull(RuntimeError):
    """Not enough free blocks for an image's embeddings."""


class EmbeddingArena:
    """A fixed pool of embedding blocks, registered for transfer."""

    def __init__(self, num_blocks: int, hidden_size: int, dtype: torch.dtype,
                 tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK, device: torch.device | str = "cpu") -> None:
        if hidden_size % 2:
            raise ValueError(f"embedding width {hidden_size} is odd; the arena stores two halves")
        if num_blocks < 1:
            raise ValueError("an embedding arena needs at least one block")
        self.num_blocks, self.hidden_size, self.dtype = num_blocks, hidden_size, dtype
        self.tokens_per_block = tokens_per_block
        half = hidden_size // 2
        self.halves = tuple(torch.zeros(num_blocks * tokens_per_block, 1, half, dtype=dtype, device=device)
                            for _ in range(2))
        layout = kv_region_layout(num_layers=1, num_blocks=num_blocks, page_size=tokens_per_block, num_kv_heads=1,
                                  head_dim=half, dtype=dtype)
        self.memory = RegisteredMemory((MemoryRegion(layout, self.halves),))
        self._free = list(range(num_blocks - 1, -1, -1))
        self._lock = threading.Lock()

    @classmethod
    def with_bytes(cls, capacity_bytes: int, hidden_size: int, dtype: torch.dtype,
                   tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK) -> "EmbeddingArena":
        """An arena of as many blocks as `capacity_bytes` holds (at least one)."""
        block = tokens_per_block * hidden_size * torch.empty((), dtype=dtype).element_size()
        return cls(max(1, capacity_bytes // block), hidden_size, dtype, tokens_per_block)

    @property
    def block_bytes(self) -> int:
        """Bytes one block holds (both halves)."""
        return self.tokens_per_block * self.hidden_size * self.halves[0].element_size()

    @property
    def num_free(self) -> int:
        """Blocks not holding anything."""
        with self._lock:
            return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks an image of `num_tokens` embeddings takes."""
        return -(-num_tokens // self.tokens_per_block)

    def allocate(self, num_tokens: int) -> list[int]:
        """Blocks for `num_tokens` embeddings; ArenaFull when too few are free."""
        need = self.blocks_for(num_tokens)
        with self._lock:
            if need > len(self._free):
                raise ArenaFull(f"{need} embedding blocks needed, {len(self._free)} free of {self.num_blocks}")
            return [self._free.pop() for _ in range(need)]

    def free(self, blocks: list[int]) -> None:
        """Give blocks back."""
        with self._lock:
            self._free.extend(blocks)

    def store(self, blocks: list[int], embeddings: torch.Tensor) -> None:
        """Write embeddings [n, hidden] into the blocks (in order)."""
        rows = self._rows(blocks, embeddings.shape[0])
        half = self.hidden_size // 2
        values = embeddings.to(self.halves[0].device, self.dtype)
        self.halves[0][rows, 0] = values[:, :half]
        self.halves[1][rows, 0] = values[:, half:]

    def load(self, blocks: list[int], num_tokens: int) -> torch.Tensor:
        """Embeddings [num_tokens, hidden] read back from the blocks (a copy, float32)."""
        rows = self._rows(blocks, num_tokens)
        return torch.cat([self.halves[0][rows, 0], self.halves[1][rows, 0]], dim=-1).float()

    def _rows(self, blocks: list[int], num_tokens: int) -> torch.Tensor:
        if len(blocks) < self.blocks_for(num_tokens):
            raise ValueError(f"{len(blocks)} blocks cannot hold {num_tokens} embeddings")
        t = self.tokens_per_block
        rows = torch.tensor([b * t + i for b in blocks for i in range(t)], dtype=torch.long)
        return rows[:num_tokens].to(self.halves[0].device)
