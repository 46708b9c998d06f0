"""An fp8 KV cache as registered memory: its scales travel in the wire layout, a tcp write moves
its blocks as raw bytes (tcp and nixl), and a peer with another dtype or other scales is refused by name."""
from __future__ import annotations

import os

os.environ.setdefault("UCX_NET_DEVICES", "lo")

import pytest  # noqa: E402
import torch  # noqa: E402

from baton.services.engine.kv.fp8 import FP8_DTYPE  # noqa: E402
from baton.services.engine.kv.kv_cache import KVCache, KVLayout, pack_scales  # noqa: E402
from baton.services.transfer import (LayoutMismatch, PeerDescriptor, TransferState,  # noqa: E402
                                     create_transfer_engine)
from baton.services.worker.kv_memory import register_kv_cache  # noqa: E402

SCALES = pack_scales([[0.5, 0.25], [1.0, 2.0]], [[0.125, 4.0], [1.0, 0.0625]])


def fp8_cache(num_blocks: int = 8, scales=SCALES, seed: int = 0) -> KVCache:
    cache = KVCache(KVLayout(2, num_blocks, 4, 2, 8, FP8_DTYPE, scales), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    for layer in range(2):
        slots = torch.arange(num_blocks * 4)
        cache.write(layer, slots, torch.randn(len(slots), 2, 8, generator=gen) * 20,
                    torch.randn(len(slots), 2, 8, generator=gen))
    return cache


def test_the_wire_layout_carries_dtype_and_scales():
    layout = register_kv_cache(fp8_cache()).layout
    msg = PeerDescriptor("w", 1, "tcp", b"", layout).to_proto()
    assert msg.layout.dtype == "float8_e4m3fn" and list(msg.layout.scales) == list(SCALES)
    assert PeerDescriptor.from_proto(msg).layout == layout
    assert register_kv_cache(fp8_cache()).layout.bytes_per_block == 2 * 2 * 4 * 2 * 8  # one byte an element


@pytest.mark.parametrize("backend", ["tcp", "nixl"])
def test_a_write_moves_fp8_blocks_bit_for_bit(backend):
    src, dst = fp8_cache(seed=1), fp8_cache(num_blocks=12, seed=2)
    before = [t.view(torch.uint8).clone() for t in dst.keys + dst.values]
    sender = create_transfer_engine(backend, "p", register_kv_cache(src))
    receiver = create_transfer_engine(backend, "d", register_kv_cache(dst))
    try:
        sender.connect(receiver.descriptor())
        assert sender.write("d", "r1", [(2, 11), (5, 0)], timeout=5.0).ok
        assert receiver.wait_received("r1", timeout=5.0) is TransferState.SUCCESS
    finally:
        sender.close()
        receiver.close()
    for i, (s, d) in enumerate(zip(src.keys + src.values, dst.keys + dst.values)):
        s, d = s.view(torch.uint8), d.view(torch.uint8)
        for block in range(12):
            rows = slice(4 * block, 4 * block + 4)
            want = {11: s[8:12], 0: s[20:24]}.get(block, before[i][rows])
            assert torch.equal(d[rows], want), f"tensor {i} block {block}"
    assert torch.equal(src.gather(1, torch.arange(20, 24), torch.float32)[0],
                       dst.gather(1, torch.arange(0, 4), torch.float32)[0])  # same values under the same scales


@pytest.mark.parametrize("other,field", [
    (lambda: KVCache(KVLayout(2, 8, 4, 2, 8, torch.float32), torch.device("cpu")), "kv.dtype: local=float8_e4m3fn "
                                                                                   "remote=float32"),
    (lambda: fp8_cache(scales=SCALES[:3] + (8.0,) + SCALES[4:]), "kv.scales[3]: local=4 remote=8"),
])
def test_an_fp8_worker_refuses_other_layouts(other, field):
    mine = create_transfer_engine("tcp", "p", register_kv_cache(fp8_cache()))
    theirs = create_transfer_engine("tcp", "d", register_kv_cache(other()))
    try:
        with pytest.raises(LayoutMismatch, match=field.replace("[", r"\[").replace("]", r"\]")):
            mine.connect(theirs.descriptor())
        with pytest.raises(LayoutMismatch, match="dtype|scales"):
            theirs.connect(mine.descriptor())
        assert mine.peer("d") is None
    finally:
        mine.close()
        theirs.close()
