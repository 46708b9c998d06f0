"""The nccl backend over gloo (host memory), between real processes: blocks land exactly (also in
several chunks); a peer killed mid-transfer fails the other side fast, long before the write's
deadline, with a clear error; the fence refuses a write the receiver gave up on, also one already
in flight; a layout that differs in KV heads names tensor parallelism; NCCL's waits (no NCCL on
this CPU: a stand-in Work) poll to the deadline. Two engines in one process run the shared backend
tests (test_engines.py)."""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from baton.services.transfer import LayoutMismatch, PeerDescriptor, TransferState
from baton.services.transfer.nccl import NcclTransferEngine
from tests.unit.transfer import nccl_peer
from tests.unit.transfer.helpers import filled_memory, small_layout

PAIRS = [(0, 5), (1, 6), (2, 7), (9, 1), (15, 0)]
ALL = [(s, 15 - s) for s in range(16)]
BLOCK = 1 << 20
"""Bytes one block id moves in nccl_peer.BIG."""


def spawn(target, *args):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    return proc, parent


def stop(proc) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(10)


def test_blocks_land_across_processes_and_a_receiver_killed_mid_transfer_fails_fast():
    proc, conn = spawn(nccl_peer.receiver_main, 11, "mp-1", PAIRS)
    try:
        tx = NcclTransferEngine("prefill-nccl", filled_memory(small_layout(**nccl_peer.BIG), seed=11))
        assert conn.poll(60), "receiver did not start"
        peer = PeerDescriptor.from_bytes(conn.recv())
        tx.connect(peer, timeout=20.0)
        sent = tx.write(peer.worker_id, "mp-1", PAIRS, timeout=20.0)
        assert sent.ok, sent.error
        assert conn.poll(30)
        assert conn.recv() == {"state": "SUCCESS", "bytes_received": len(PAIRS) * BLOCK, "bad": []}

        start = time.monotonic()
        dead = tx.write(peer.worker_id, "mp-2", ALL, timeout=30.0)  # accepted, then the receiver dies
        elapsed = time.monotonic() - start
        assert dead.state is TransferState.FAILED, dead
        assert "sending the blocks over gloo failed" in dead.error, dead.error
        assert elapsed < 5.0, elapsed  # the closed connection, not the 30 s deadline
        assert tx.peer(peer.worker_id) is None  # the broken group is dropped: the next connect handshakes anew
        tx.close()
    finally:
        stop(proc)


def test_a_sender_killed_mid_transfer_fails_the_receiver_fast_and_the_fence_holds(make_engine):
    rx = make_engine("nccl", "decode-nccl", small_layout(**nccl_peer.BIG), seed=99)
    before = [t.clone() for t in rx.memory.tensors]
    proc, conn = spawn(nccl_peer.sender_main, 11, ALL)
    try:
        conn.send(rx.descriptor().to_bytes())
        assert conn.poll(60) and conn.recv() == "connected"
        conn.send("go")
        start = time.monotonic()
        state = rx.wait_received("mp-dead", timeout=30.0)
        assert state is TransferState.FAILED
        assert time.monotonic() - start < 5.0
        assert "receiving the blocks from 'prefill-nccl' over gloo failed" in rx._inbound["mp-dead"].error
    finally:
        stop(proc)
    rx.forget("mp-dead")  # decode gives up on it and frees the blocks
    assert all(map(torch.equal, before, rx.memory.tensors))
    late = make_engine("nccl", "prefill-nccl", small_layout(**nccl_peer.BIG), seed=11)
    late.connect(rx.descriptor())
    refused = late.write("decode-nccl", "mp-dead", PAIRS, timeout=5.0)
    assert refused.state is TransferState.FAILED and "given up by the receiver" in refused.error
    assert all(map(torch.equal, before, rx.memory.tensors))
    assert late.write("decode-nccl", "fresh", PAIRS, timeout=5.0).ok


class _ForgetsInFlight(NcclTransferEngine):
    """A sender whose receiver gives up between accepting a write and its bytes arriving."""

    receiver = None

    def _send_and_commit(self, link, group, transfer_id, src, deadline):
        self.receiver.forget(transfer_id)
        return super()._send_and_commit(link, group, transfer_id, src, deadline)


def test_a_write_in_flight_when_the_receiver_gives_up_does_not_land(make_engine):
    rx = make_engine("nccl", "d", seed=2)
    tx = _ForgetsInFlight("p", filled_memory(small_layout(), seed=1))
    tx.receiver = rx
    try:
        tx.connect(rx.descriptor())
        before = [t.clone() for t in rx.memory.tensors]
        handle = tx.write("d", "in-flight", [(1, 2), (3, 4)], timeout=5.0)
        assert handle.state is TransferState.FAILED and "given up by the receiver" in handle.error
        assert all(map(torch.equal, before, rx.memory.tensors))
        assert rx.received("in-flight") is TransferState.WAITING_FOR_INPUT
        tx.receiver = type("NoOp", (), {"forget": staticmethod(lambda tid: None)})
        tx.connect(rx.descriptor())  # the failed write dropped the group: a new handshake
        assert tx.write("d", "next", [(1, 2)], timeout=5.0).ok
    finally:
        tx.close()


def test_different_kv_heads_name_tensor_parallelism(make_engine):
    tx = make_engine("nccl", "p")
    rx = make_engine("nccl", "d", small_layout(num_kv_heads=1))
    with pytest.raises(LayoutMismatch, match="num_kv_heads: local=2 remote=1.*tensor-parallel size"):
        tx.connect(rx.descriptor())


def test_a_tcp_engine_cannot_talk_to_an_nccl_one(make_engine):
    tx, rx = make_engine("tcp", "p"), make_engine("nccl", "d")
    with pytest.raises(Exception, match="speaks 'nccl', this engine 'tcp'"):
        tx.connect(rx.descriptor())
    assert PeerDescriptor.from_bytes(rx.descriptor().to_bytes()) == rx.descriptor()


def test_a_write_in_several_chunks_lands_exactly(make_engine):
    tx = make_engine("nccl", "p", seed=1, chunk_bytes=2 * 1024)  # 2 blocks (1 KiB each) per message: 4 messages
    rx = make_engine("nccl", "d", small_layout(num_blocks=24), seed=2)
    before = [t.clone() for t in rx.memory.tensors]
    pairs = [(3, 10), (0, 2), (7, 3), (8, 4), (9, 5), (15, 23), (12, 0)]
    tx.connect(rx.descriptor())
    assert tx.chunk_blocks == 2
    handle = tx.write("d", "chunks", pairs, timeout=5.0)
    assert handle.ok and handle.bytes == len(pairs) * 1024, handle.error
    assert rx.wait_received("chunks", 5.0) is TransferState.SUCCESS
    written = {d: s for s, d in pairs}
    for i, (src, got) in enumerate(zip(tx.memory.tensors, rx.memory.tensors, strict=True)):
        for b in range(24):
            want = src.view(16, -1)[written[b]] if b in written else before[i].view(24, -1)[b]
            assert torch.equal(got.view(24, -1)[b], want), (i, b)


class _GpuWork:
    """Stands in for an NCCL Work (no NCCL on this CPU): done after `polls` queries, or never."""

    def __init__(self, polls):
        self.polls, self.waited = polls, False

    def is_completed(self):
        self.polls = None if self.polls is None else self.polls - 1
        return self.polls is not None and self.polls <= 0

    def wait(self):
        self.waited = True


def test_nccl_waits_poll_until_done_or_the_deadline():
    from baton.services.transfer.nccl_group import wait_work

    done = _GpuWork(polls=5)
    assert wait_work(done, "nccl", time.monotonic() + 5.0) is None and done.waited  # then orders the stream
    start = time.monotonic()
    assert "timed out" in wait_work(_GpuWork(polls=None), "nccl", start + 0.2)
    assert 0.2 <= time.monotonic() - start < 0.5  # polls back off to 1 ms, never past the deadline by much
