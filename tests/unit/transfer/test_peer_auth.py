"""The KV transfer port authenticates its peer (peer_auth.py): a sender without the cluster's
key cannot handshake, a forged or replayed data message changes no byte and marks no transfer,
a frame larger than the receiver's largest region is refused, and nixl drops notifications
whose MAC does not verify. Real engines over loopback."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
import zmq

from baton.services.transfer import TransferError, TransferState
from baton.services.transfer.peer_auth import AUTH_FRAME_BYTES
from tests.unit.transfer.helpers import small_layout

KEY = b"k" * 32


def snapshot(engine) -> list[torch.Tensor]:
    return [t.clone() for t in engine.memory.tensors]


def unchanged(engine, before) -> bool:
    return all(torch.equal(a, b) for a, b in zip(engine.memory.tensors, before, strict=True))


class RawPeer:
    """A stranger's DEALER socket on a receiver's transfer port (no engine, no key)."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ask(self, frames: list, timeout_ms: int = 2000) -> list[bytes] | None:
        req = os.urandom(8)
        self.sock.send_multipart([frames[0], req, *frames[1:]])
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return None
        reply = self.sock.recv_multipart()
        assert reply[1] == req
        return [reply[0], *reply[2:]]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def forged_data(receiver, dst: list[int], auth: bytes) -> list:
    header = json.dumps({"transfer_id": "victim", "target_epoch": receiver.epoch, "source": "x", "dst": dst}).encode()
    payload = [bytes(len(dst) * region.geometry.block_bytes) for _, region in receiver.memory.tensor_blocks()]
    return [b"data", auth, header, *payload]


def test_a_sender_without_the_key_cannot_handshake_nor_write(make_engine):
    receiver = make_engine("tcp", "d", seed=2, auth_key=KEY)
    before = snapshot(receiver)
    for wrong in (b"", b"w" * 32):  # an open-cluster engine, another cluster's engine
        stranger = make_engine("tcp", "s", seed=1, auth_key=wrong)
        with pytest.raises(TransferError, match="authentication failed"):
            stranger.connect(receiver.descriptor(), timeout=2.0)
        assert stranger.peer("d") is None
    raw = RawPeer(receiver.endpoint)
    try:
        every_block = list(range(receiver.layout.num_blocks))
        for auth in (b"", os.urandom(AUTH_FRAME_BYTES)):  # no session, a made-up one
            reply = raw.ask(forged_data(receiver, every_block, auth))
            assert reply is not None and reply[0] == b"unauthenticated"
        nonce = raw.ask([b"challenge", b"", os.urandom(16)])  # a challenge answered with a wrong MAC
        hello = raw.ask([b"hello", b"", receiver.descriptor().to_bytes(), nonce[1], os.urandom(32)])
        assert hello[0] == b"error" and b"authentication failed" in hello[1]
    finally:
        raw.close()
    assert unchanged(receiver, before)
    assert receiver.received("victim") is TransferState.WAITING_FOR_INPUT  # not even marked failed
    assert receiver._sessions.refused >= 5


def test_the_right_key_writes_and_a_replayed_message_is_dropped(make_engine):
    sender = make_engine("tcp", "p", seed=1, auth_key=KEY)
    receiver = make_engine("tcp", "d", seed=2, auth_key=KEY)
    sender.connect(receiver.descriptor())
    assert sender.write("d", "t1", [(1, 2)], timeout=5.0).ok
    assert receiver.wait_received("t1", 5.0) is TransferState.SUCCESS
    link = sender._links["d"]
    session, seq = link.session, link.session.seq
    before = snapshot(receiver)
    # replaying the last message's auth frame (same seq) under the same session is refused
    link.session.seq = seq - 1
    header = json.dumps({"transfer_id": "t1-again", "target_epoch": receiver.epoch, "source": "p",
                         "dst": [3]}).encode()
    frames = [header, *[bytes(region.geometry.block_bytes) for _, region in receiver.memory.tensor_blocks()]]
    kind, _ = link.request(b"data", frames, time.monotonic() + 2)
    assert kind == b"unauthenticated" and link.session is session
    assert unchanged(receiver, before) and receiver.received("t1-again") is TransferState.WAITING_FOR_INPUT
    assert sender.write("d", "t2", [(4, 5)], timeout=5.0).ok  # the next sequence number is fresh


def test_a_frame_larger_than_the_region_is_refused(make_engine):
    receiver = make_engine("tcp", "d", seed=2, auth_key=KEY)
    assert receiver.max_frame_bytes < 1 << 20
    before = snapshot(receiver)
    raw = RawPeer(receiver.endpoint)
    try:
        big = bytes(receiver.max_frame_bytes + 1)
        assert raw.ask([b"challenge", b"", big], timeout_ms=1000) is None  # zmq dropped the connection
        assert raw.ask([b"data", b"", b"{}", big], timeout_ms=500) is None
    finally:
        raw.close()
    assert unchanged(receiver, before)
    sender = make_engine("tcp", "p", seed=1, auth_key=KEY)  # the port still serves members
    sender.connect(receiver.descriptor())
    assert sender.write("d", "ok", [(0, 0)], timeout=5.0).ok


def test_an_explicit_cap_refuses_smaller_frames(make_engine):
    receiver = make_engine("tcp", "d", seed=2, auth_key=KEY, max_frame_bytes=2048)
    sender = make_engine("tcp", "p", seed=1, auth_key=KEY)
    sender.connect(receiver.descriptor())
    per_tensor_block = receiver.memory.tensor_blocks()[0][1].geometry.block_bytes
    small = [(i, i) for i in range(2048 // per_tensor_block)]
    assert sender.write("d", "fits", small, timeout=5.0).ok
    too_big = [(i, i) for i in range(2048 // per_tensor_block + 1)]
    assert not sender.write("d", "too-big", too_big, timeout=1.0).ok


def test_nixl_drops_notifications_without_the_key(make_engine):
    receiver = make_engine("nixl", "d", seed=2, auth_key=KEY)
    member = make_engine("nixl", "p", seed=1, auth_key=KEY)
    member.connect(receiver.descriptor())
    assert member.write("d", "good", [(1, 1)], timeout=5.0).ok
    assert receiver.wait_received("good", 5.0) is TransferState.SUCCESS
    stranger = make_engine("nixl", "s", seed=3, auth_key=b"")
    stranger.connect(receiver.descriptor())
    assert stranger.write("d", "forged", [], timeout=5.0).ok  # a bare notification, sent
    assert receiver.wait_received("forged", 1.0) is TransferState.WAITING_FOR_INPUT
    assert receiver._refusals.refused >= 1
