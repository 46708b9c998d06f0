"""The backend-independent parts: descriptors and their wire form, layout checks, the factory, nixl metadata."""
from __future__ import annotations

import pytest
import torch

from baton.protos.baton.v1 import kv_pb2
from baton.services.transfer import LayoutMismatch, MemoryLayout, PeerDescriptor, create_transfer_engine
from baton.services.transfer.descriptor import check_layout
from baton.services.transfer.nixl import NixlPeerInfo, coalesce, pack_metadata, unpack_metadata
from tests.unit.transfer.helpers import filled_memory, side_region, small_layout


def kv(**overrides) -> MemoryLayout:
    return MemoryLayout((small_layout(**overrides),))


def test_descriptor_proto_round_trip():
    desc = PeerDescriptor("decode-3:50051", 2**63 - 5, "nixl", b"\x00meta", kv(dtype=torch.bfloat16))
    msg = desc.to_proto()
    assert isinstance(msg, kv_pb2.TransferPeer)
    assert msg.backend == kv_pb2.NIXL and msg.layout == kv_pb2.KVLayout(
        num_layers=2, page_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16", num_blocks=16)
    assert PeerDescriptor.from_proto(msg) == desc
    assert PeerDescriptor.from_bytes(desc.to_bytes()) == desc
    with pytest.raises(ValueError, match="unsupported transfer backend"):
        PeerDescriptor.from_proto(kv_pb2.TransferPeer(backend=kv_pb2.TRANSFER_BACKEND_UNSPECIFIED))


def test_the_wire_carries_a_kv_layout_only():
    desc = PeerDescriptor("w", 1, "tcp", b"", MemoryLayout((small_layout(), side_region())))
    with pytest.raises(ValueError, match="not a KV-cache layout"):
        desc.to_proto()


def test_layout_check_ignores_num_blocks_and_names_every_field():
    check_layout(kv(), kv(num_blocks=99), "peer")
    with pytest.raises(LayoutMismatch) as info:
        check_layout(kv(), kv(num_layers=3, page_size=16, num_kv_heads=4), "peer-x")
    text = str(info.value)
    assert "peer-x" in text
    for part in ("kv.num_layers: local=2 remote=3", "kv.page_size: local=4 remote=16",
                 "kv.num_kv_heads: local=2 remote=4"):
        assert part in text
    assert "head_dim" not in text and "dtype" not in text


def test_factory_rejects_unknown_backend_and_foreign_memory():
    with pytest.raises(ValueError, match="unknown transfer backend 'rdma'.*tcp, nixl"):
        create_transfer_engine("rdma", "w", filled_memory(small_layout(), seed=0))
    with pytest.raises(TypeError, match="RegisteredMemory, not list"):
        create_transfer_engine("tcp", "w", [torch.zeros(4)])


def test_tcp_epochs_are_fresh_per_instance():
    a = create_transfer_engine("tcp", "w", filled_memory(small_layout(), seed=0))
    b = create_transfer_engine("tcp", "w", filled_memory(small_layout(), seed=0))
    try:
        assert a.epoch != b.epoch and 0 < a.epoch < 2**63
        assert a.descriptor().metadata.startswith(b"tcp://127.0.0.1:")
        assert a.descriptor().metadata != b.descriptor().metadata
        assert a.descriptor().layout == kv()
    finally:
        a.close()
        b.close()


def test_coalesce_merges_runs_consecutive_on_both_sides():
    s0, d0, n = coalesce([7, 8, 9, 3, 0, 1], [3, 4, 5, 10, 2, 9])
    assert list(zip(s0.tolist(), d0.tolist(), n.tolist())) == [(0, 2, 1), (1, 9, 1), (3, 10, 1), (7, 3, 3)]


def test_nixl_metadata_round_trip():
    info = NixlPeerInfo("VRAM", 3, (1 << 40, 2 << 40, 3, 4), (256, 256, 10, 10), b"agent-md")
    packed = pack_metadata(info)
    assert unpack_metadata(packed) == info
    with pytest.raises(Exception, match="not baton nixl metadata"):
        unpack_metadata(b"X" * 64)
    with pytest.raises(Exception, match="too short for 4 tensors"):
        unpack_metadata(packed[:40])
    with pytest.raises(ValueError, match="4 addresses but 1 block sizes"):
        pack_metadata(NixlPeerInfo("DRAM", 0, (1, 2, 3, 4), (8,), b""))
