"""The engine's KV cache as the transfer engines see it: one registered-memory region, "kv".

Owns the conversion from the engine's `KVLayout` / `KVCache` to transfer's `RegionLayout` /
`RegisteredMemory` (the transfer package knows no engine; the worker shell knows both).
The region registers the cache's own tensors, no copies, in the order K_0, V_0, K_1, V_1, ...;
a block is one page of one layer's K (or V): page_size x num_kv_heads x head_dim elements,
a contiguous byte range of the flat [num_blocks * page_size, num_kv_heads, head_dim] tensor.
An fp8 cache's scales travel in the region layout, so peers with other scales refuse each other.
"""
from __future__ import annotations

from baton.services.engine.kv.kv_cache import KVCache, KVLayout
from baton.services.transfer.memory import MemoryRegion, RegionLayout, RegisteredMemory, kv_region_layout


def kv_region(layout: KVLayout) -> RegionLayout:
    """The transfer layout of a KV cache shaped by `layout`."""
    return kv_region_layout(num_layers=layout.num_layers, num_blocks=layout.num_blocks, page_size=layout.page_size,
                            num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=layout.dtype,
                            scales=layout.scales)


def register_kv_cache(cache: KVCache) -> RegisteredMemory:
    """The memory a transfer engine registers for `cache` (its tensors, shared, not copied)."""
    tensors = tuple(t for layer in range(cache.layout.num_layers) for t in (cache.keys[layer], cache.values[layer]))
    return RegisteredMemory((MemoryRegion(kv_region(cache.layout), tensors),))
