"""Small registered memories shared by the transfer tests and their child processes.

Built from plain tensors through transfer's own description (no engine): a "kv" region by
default, seeded so that each side knows the other's contents without sending them.
"""
from __future__ import annotations

import torch

from baton.services.transfer.memory import (
    BlockGeometry,
    MemoryRegion,
    RegionLayout,
    RegisteredMemory,
    kv_region_layout,
)

BACKENDS = ["tcp", "nixl"]


def small_layout(**overrides) -> RegionLayout:
    """A KV region: 2 layers, 16 blocks of 4 tokens x 2 heads x 8 (float32) unless overridden."""
    fields = dict(num_layers=2, num_blocks=16, page_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)
    fields.update(overrides)
    return kv_region_layout(**fields)


def side_region(name: str = "side", num_blocks: int = 16, width: int = 5, dtype=torch.bfloat16) -> RegionLayout:
    """A non-KV region (one tensor of `width`-element blocks), as image embeddings will be."""
    return RegionLayout(name, (("buffers", 1),), BlockGeometry(num_blocks, (("width", width),), dtype))


def filled_memory(*regions: RegionLayout, seed: int) -> RegisteredMemory:
    """CPU tensors for `regions` whose every element is random (seeded), so any misplaced byte shows."""
    gen = torch.Generator().manual_seed(seed)
    built = []
    for region in regions:
        geometry = region.geometry
        shape = (geometry.num_blocks, *(size for _, size in geometry.block_dims))
        tensors = tuple(torch.randn(shape, generator=gen).to(geometry.dtype) for _ in range(region.num_tensors))
        built.append(MemoryRegion(region, tensors))
    return RegisteredMemory(tuple(built))
