"""The KV-cache memory: one key and one value tensor per layer, addressed by slot.

Slot s lives in block s // page_size at offset s % page_size; blocks themselves are
handed out by `BlockPool`. The tensors are flat [num_blocks * page_size, kv_heads,
head_dim] so a block is a contiguous byte range (what the transfer engines move).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """Shape of the cache; also what two workers compare before moving blocks."""

    num_layers: int
    """Decoder layers (one K and one V tensor each)."""
    num_blocks: int
    """Blocks in the pool."""
    page_size: int
    """Tokens per block."""
    num_kv_heads: int
    """Key/value heads per token."""
    head_dim: int
    """Width of one head."""
    dtype: torch.dtype
    """Element type."""

    @property
    def bytes_per_token(self) -> int:
        """K plus V bytes of one token over all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


class KVCache:
    """Per-layer key and value storage."""

    def __init__(self, layout: KVLayout, device: torch.device) -> None:
        self.layout = layout
        slots = layout.num_blocks * layout.page_size
        shape = (slots, layout.num_kv_heads, layout.head_dim)
        self.keys = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]
        self.values = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' K/V [T, Hkv, D] at their slots."""
        self.keys[layer].index_copy_(0, slots, k)
        self.values[layer].index_copy_(0, slots, v)
