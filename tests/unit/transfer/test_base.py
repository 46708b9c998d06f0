"""The backend-independent parts: descriptors, layout checks, the factory, nixl metadata."""
from __future__ import annotations

import pytest
import torch

from baton.protos.baton.v1 import kv_pb2
from baton.services.transfer import LayoutMismatch, PeerDescriptor, create_transfer_engine
from baton.services.transfer.descriptor import check_layout
from baton.services.transfer.nixl import NixlPeerInfo, coalesce, pack_metadata, unpack_metadata
from tests.unit.transfer.helpers import filled_cache, small_layout


def test_descriptor_proto_round_trip():
    desc = PeerDescriptor("decode-3:50051", 2**63 - 5, "nixl", b"\x00meta", small_layout(dtype=torch.bfloat16))
    msg = desc.to_proto()
    assert isinstance(msg, kv_pb2.TransferPeer)
    assert msg.backend == kv_pb2.NIXL and msg.layout.dtype == "bfloat16" and msg.layout.num_blocks == 16
    assert PeerDescriptor.from_proto(msg) == desc
    assert PeerDescriptor.from_bytes(desc.to_bytes()) == desc
    with pytest.raises(ValueError, match="unsupported transfer backend"):
        PeerDescriptor.from_proto(kv_pb2.TransferPeer(backend=kv_pb2.NCCL))


def test_layout_check_ignores_num_blocks_and_names_every_field():
    check_layout(small_layout(), small_layout(num_blocks=99), "peer")
    with pytest.raises(LayoutMismatch) as info:
        check_layout(small_layout(), small_layout(num_layers=3, page_size=16, num_kv_heads=4), "peer-x")
    text = str(info.value)
    assert "peer-x" in text
    for part in ("num_layers: local=2 remote=3", "page_size: local=4 remote=16", "num_kv_heads: local=2 remote=4"):
        assert part in text


def test_factory_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown transfer backend 'rdma'.*tcp, nixl"):
        create_transfer_engine("rdma", "w", filled_cache(small_layout(), 0))


def test_tcp_epochs_are_fresh_per_instance():
    a = create_transfer_engine("tcp", "w", filled_cache(small_layout(), 0))
    b = create_transfer_engine("tcp", "w", filled_cache(small_layout(), 0))
    try:
        assert a.epoch != b.epoch and 0 < a.epoch < 2**63
        assert a.descriptor().metadata.startswith(b"tcp://127.0.0.1:")
        assert a.descriptor().metadata != b.descriptor().metadata
    finally:
        a.close()
        b.close()


def test_coalesce_merges_runs_consecutive_on_both_sides():
    s0, d0, n = coalesce([7, 8, 9, 3, 0, 1], [3, 4, 5, 10, 2, 9])
    assert list(zip(s0.tolist(), d0.tolist(), n.tolist())) == [(0, 2, 1), (1, 9, 1), (3, 10, 1), (7, 3, 3)]


def test_nixl_metadata_round_trip():
    info = NixlPeerInfo("VRAM", 3, 256, (1 << 40, 2 << 40, 3, 4), b"agent-md")
    assert unpack_metadata(pack_metadata(info)) == info
    with pytest.raises(Exception, match="not baton nixl metadata"):
        unpack_metadata(b"X" * 64)
