"""A memory of several regions, each with its own block geometry, moved block by block.

Over nixl, whose handshake reads only the backend metadata. The tcp hello carries the
descriptor's wire form (`baton.v1.KVLayout`, one KV region), so tcp refuses such a memory at
connect until the proto describes other regions.
"""
from __future__ import annotations

import pytest
import torch

from baton.services.transfer import LayoutMismatch, TransferState, create_transfer_engine
from tests.unit.transfer.helpers import filled_memory, side_region, small_layout

REGIONS = (small_layout(), side_region(num_blocks=12, width=3))


@pytest.fixture
def engines():
    made = []

    def make(backend: str, worker_id: str, *regions, seed: int):
        engine = create_transfer_engine(backend, worker_id, filled_memory(*regions, seed=seed))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def test_nixl_moves_every_region(engines):
    sender = engines("nixl", "p", *REGIONS, seed=1)
    receiver = engines("nixl", "d", small_layout(num_blocks=20), side_region(num_blocks=10, width=3), seed=2)
    before = [t.clone() for t in receiver.memory.tensors]
    pairs = [(0, 9), (1, 3), (2, 4), (11, 0)]  # 1..2 -> 3..4 is one run
    sender.connect(receiver.descriptor())
    handle = sender.write("d", "t", pairs, timeout=5.0)
    assert handle.ok, handle.error
    assert handle.bytes == len(pairs) * (4 * 256 + 3 * 2)  # 4 KV tensors of 256-byte blocks + 3 bfloat16
    assert receiver.wait_received("t", timeout=5.0) is TransferState.SUCCESS
    written = {d: s for s, d in pairs}
    sent, got = sender.memory.tensor_blocks(), receiver.memory.tensor_blocks()
    for i, ((src, _), (dst, region)) in enumerate(zip(sent, got, strict=True)):
        for b in range(region.geometry.num_blocks):
            want = src[written[b]] if b in written else before[i].view(region.geometry.num_blocks, -1)[b]
            assert torch.equal(dst[b], want), f"tensor {i} block {b}"
    with pytest.raises(ValueError, match="out of range"):
        sender.write("d", "u", [(12, 0)], timeout=1.0)  # block 12 exists in "kv" but not in "side"


def test_regions_must_match_at_handshake(engines):
    sender = engines("nixl", "p", *REGIONS, seed=1)
    kv_only = engines("nixl", "d", small_layout(), seed=2)
    with pytest.raises(LayoutMismatch, match="region 'side': local only"):
        sender.connect(kv_only.descriptor())
    other = engines("nixl", "e", small_layout(), side_region(width=4), seed=3)
    with pytest.raises(LayoutMismatch, match="side.width: local=3 remote=4"):
        sender.connect(other.descriptor())


def test_tcp_needs_the_wire_form(engines):
    sender = engines("tcp", "p", *REGIONS, seed=1)
    receiver = engines("tcp", "d", *REGIONS, seed=2)
    with pytest.raises(ValueError, match="not a KV-cache layout"):
        sender.connect(receiver.descriptor())
