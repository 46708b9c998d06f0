"""Small KV layouts and seeded caches shared by the transfer tests and their child processes."""
from __future__ import annotations

import torch

from baton.services.engine.kv.kv_cache import KVCache, KVLayout

BACKENDS = ["tcp", "nixl"]


def small_layout(**overrides) -> KVLayout:
    fields = dict(num_layers=2, num_blocks=16, page_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)
    fields.update(overrides)
    return KVLayout(**fields)


def filled_cache(layout: KVLayout, seed: int) -> KVCache:
    """A CPU cache whose every element is random (seeded), so any misplaced byte shows."""
    cache = KVCache(layout, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    for tensor in cache.keys + cache.values:
        tensor.copy_(torch.randn(tensor.shape, generator=gen).to(layout.dtype))
    return cache
