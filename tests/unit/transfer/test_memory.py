"""Registered memory: block geometry, region and memory layouts, what peers compare, the KV form."""
from __future__ import annotations

import pytest
import torch

from baton.services.transfer.memory import (
    BlockGeometry,
    MemoryLayout,
    MemoryRegion,
    RegionLayout,
    RegisteredMemory,
    kv_sizes,
    layout_mismatches,
)
from tests.unit.transfer.helpers import filled_memory, side_region, small_layout


def test_kv_region_geometry():
    region = small_layout()
    assert region.name == "kv" and region.num_tensors == 4  # K and V of 2 layers
    assert region.geometry.block_elements == 4 * 2 * 8 and region.geometry.block_bytes == 4 * 2 * 8 * 4
    assert region.bytes_per_block == 4 * 256
    assert kv_sizes(MemoryLayout((region,))) == dict(num_layers=2, num_blocks=16, page_size=4, num_kv_heads=2,
                                                     head_dim=8, dtype=torch.float32)


def test_kv_sizes_refuses_other_memories():
    with pytest.raises(ValueError, match="not a KV-cache layout"):
        kv_sizes(MemoryLayout((side_region(),)))
    odd = RegionLayout("kv", (("num_layers", 2),), small_layout().geometry)
    with pytest.raises(ValueError, match="not in the KV-cache form"):
        kv_sizes(MemoryLayout((odd,)))


def test_memory_with_several_regions():
    memory = filled_memory(small_layout(), side_region(num_blocks=9, width=3), seed=0)
    layout = memory.layout
    assert [r.name for r in layout.regions] == ["kv", "side"] and layout.region("side").num_tensors == 1
    assert layout.num_blocks == 9  # block ids valid in every region
    assert layout.bytes_per_block == 4 * 256 + 3 * 2
    assert len(memory.tensors) == 5 and memory.tensors[-1].dtype == torch.bfloat16
    views = memory.tensor_blocks()
    assert [v.shape for v, _ in views] == [torch.Size([16, 64])] * 4 + [torch.Size([9, 3])]
    assert views[0][0].data_ptr() == memory.tensors[0].data_ptr()  # views, not copies
    with pytest.raises(KeyError):
        layout.region("missing")


def test_mismatches_name_region_and_field():
    local = MemoryLayout((small_layout(), side_region(width=5)))
    assert layout_mismatches(local, MemoryLayout((small_layout(num_blocks=3), side_region(num_blocks=2)))) == []
    remote = MemoryLayout((small_layout(head_dim=16, dtype=torch.float16), side_region("other")))
    assert layout_mismatches(local, remote) == [
        "kv.head_dim: local=8 remote=16", "kv.dtype: local=float32 remote=float16",
        "region 'side': local only", "region 'other': remote only"]
    reshaped = RegionLayout("side", (("buffers", 1),), BlockGeometry(16, (("tokens", 1), ("width", 5)),
                                                                      torch.bfloat16))
    assert layout_mismatches(MemoryLayout((side_region(),)), MemoryLayout((reshaped,))) == [
        "side: local=(width=5) remote=(tokens=1, width=5)"]


def test_region_checks_its_tensors():
    region = small_layout(num_layers=1)
    good = [torch.zeros(16 * 4, 2, 8) for _ in range(2)]
    MemoryRegion(region, tuple(good))
    with pytest.raises(ValueError, match="has 1 tensors"):
        MemoryRegion(region, tuple(good[:1]))
    with pytest.raises(ValueError, match="is not 16 contiguous blocks"):
        MemoryRegion(region, (good[0], torch.zeros(15 * 4, 2, 8)))
    with pytest.raises(ValueError, match="is not 16 contiguous blocks"):
        MemoryRegion(region, (good[0], torch.zeros(16 * 4, 2, 8, dtype=torch.float16)))
    with pytest.raises(ValueError, match="contiguous=False"):
        MemoryRegion(region, (good[0], torch.zeros(8, 2, 16 * 4).transpose(0, 2)))


def test_layout_and_memory_checks():
    with pytest.raises(ValueError, match="names repeat"):
        BlockGeometry(4, (("a", 1), ("a", 2)), torch.float32)
    with pytest.raises(ValueError, match="must not be negative"):
        BlockGeometry(-1, (("a", 1),), torch.float32)
    with pytest.raises(ValueError, match="needs a name"):
        RegionLayout("", (("n", 1),), BlockGeometry(4, (("a", 1),), torch.float32))
    with pytest.raises(ValueError, match="distinct names"):
        MemoryLayout((side_region(), side_region()))
    with pytest.raises(ValueError, match="distinct names"):
        RegisteredMemory(())


def test_memory_lives_on_one_device():
    cpu = filled_memory(small_layout(), seed=0).regions[0]
    side = side_region()
    meta = MemoryRegion(side, (torch.empty(16, 5, dtype=torch.bfloat16, device="meta"),))
    with pytest.raises(ValueError, match="share one device"):
        RegisteredMemory((cpu, meta))
