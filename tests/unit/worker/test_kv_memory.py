"""The engine's KV cache as registered memory: same tensors, K/V order, layout, and a real transfer."""
from __future__ import annotations

import os

os.environ.setdefault("UCX_NET_DEVICES", "lo")

import torch  # noqa: E402

from baton.protos.baton.v1 import kv_pb2  # noqa: E402
from baton.services.engine.kv.kv_cache import KVCache, KVLayout  # noqa: E402
from baton.services.transfer import PeerDescriptor, TransferState, create_transfer_engine  # noqa: E402
from baton.services.worker.kv_memory import register_kv_cache  # noqa: E402

LAYOUT = KVLayout(num_layers=3, num_blocks=8, page_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)


def seeded_cache(seed: int, layout: KVLayout = LAYOUT) -> KVCache:
    cache = KVCache(layout, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    for tensor in cache.keys + cache.values:
        tensor.copy_(torch.randn(tensor.shape, generator=gen))
    return cache


def test_registers_the_cache_tensors_in_k_v_order():
    cache = seeded_cache(0)
    memory = register_kv_cache(cache)
    expected = [t for layer in range(3) for t in (cache.keys[layer], cache.values[layer])]
    assert [t.data_ptr() for t in memory.tensors] == [t.data_ptr() for t in expected]  # shared, not copied
    [region] = memory.layout.regions
    assert region.name == "kv" and region.geometry.num_blocks == 8
    assert region.geometry.block_bytes == 4 * 2 * 8 * 4
    assert memory.layout.bytes_per_block == LAYOUT.bytes_per_token * LAYOUT.page_size


def test_the_wire_layout_is_the_engine_layout():
    msg = PeerDescriptor("w", 1, "tcp", b"", register_kv_cache(seeded_cache(0)).layout).to_proto().layout
    assert msg == kv_pb2.KVLayout(num_layers=3, num_blocks=8, page_size=4, num_kv_heads=2, head_dim=8,
                                  dtype="float32")


def test_a_tcp_write_lands_in_the_engine_cache():
    src_cache, dst_cache = seeded_cache(1), seeded_cache(2, KVLayout(3, 12, 4, 2, 8, torch.float32))
    before = [t.clone() for t in dst_cache.keys + dst_cache.values]
    sender = create_transfer_engine("tcp", "p", register_kv_cache(src_cache))
    receiver = create_transfer_engine("tcp", "d", register_kv_cache(dst_cache))
    try:
        sender.connect(receiver.descriptor())
        handle = sender.write("d", "r1", [(2, 11), (5, 0)], timeout=5.0)
        assert handle.ok, handle.error
        assert handle.bytes == 2 * LAYOUT.bytes_per_token * LAYOUT.page_size
        assert receiver.wait_received("r1", timeout=5.0) is TransferState.SUCCESS
    finally:
        sender.close()
        receiver.close()
    page = LAYOUT.page_size
    for i, (src, dst) in enumerate(zip(src_cache.keys + src_cache.values, dst_cache.keys + dst_cache.values)):
        for block in range(12):
            rows = slice(block * page, (block + 1) * page)
            want = {11: src[2 * page:3 * page], 0: src[5 * page:6 * page]}.get(block, before[i][rows])
            assert torch.equal(dst[rows], want), f"tensor {i} block {block}"
