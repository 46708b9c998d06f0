"""The transfer backends, two engines in one process over loopback."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from baton.services.transfer import LayoutMismatch, TransferError, TransferState
from tests.unit.transfer.helpers import BACKENDS, small_layout

pytestmark = pytest.mark.parametrize("backend", [*BACKENDS, "nccl"])  # nccl: over gloo here

PER_BLOCK = 2 * 2 * 4 * 2 * 8 * 4
"""Bytes one block id moves in small_layout(): K and V x 2 layers x 4 tokens x 2 heads x 8 x float32."""


def blocks(tensor: torch.Tensor, num_blocks: int) -> torch.Tensor:
    return tensor.view(num_blocks, -1)


def snapshot(engine) -> list[torch.Tensor]:
    return [t.clone() for t in engine.memory.tensors]


def assert_landed(sender, receiver, pairs, before) -> None:
    """dst blocks hold the src blocks; every other receiver block is as it was."""
    ns, nr = sender.layout.num_blocks, receiver.layout.num_blocks
    written = {d: src for src, d in pairs}
    for i, (src_t, dst_t) in enumerate(zip(sender.memory.tensors, receiver.memory.tensors, strict=True)):
        for b in range(nr):
            want = blocks(src_t, ns)[written[b]] if b in written else blocks(before[i], nr)[b]
            assert torch.equal(blocks(dst_t, nr)[b], want), f"tensor {i} block {b}"


def test_scattered_write_lands_exactly(backend, make_engine):
    sender = make_engine(backend, "prefill-0", seed=1)
    receiver = make_engine(backend, "decode-0", small_layout(num_blocks=24), seed=2)
    before = snapshot(receiver)
    pairs = [(3, 10), (0, 2), (7, 3), (8, 4), (9, 5), (15, 23), (12, 0)]  # 7..9 -> 3..5 is one run
    assert receiver.received("t1") is TransferState.WAITING_FOR_INPUT

    sender.connect(receiver.descriptor())
    handle = sender.write("decode-0", "t1", pairs, timeout=5.0)

    assert handle.state is TransferState.SUCCESS, handle.error
    assert receiver.wait_received("t1", timeout=5.0) is TransferState.SUCCESS
    assert_landed(sender, receiver, pairs, before)
    expected = len(pairs) * PER_BLOCK
    assert handle.bytes == sender.bytes_sent == receiver.bytes_received == expected
    assert sender.bytes_received == 0 and receiver.bytes_sent == 0
    receiver.forget("t1")
    assert receiver.received("t1") is TransferState.WAITING_FOR_INPUT


def test_empty_write_notifies(backend, make_engine):
    sender, receiver = make_engine(backend, "p"), make_engine(backend, "d", seed=3)
    before = snapshot(receiver)
    sender.connect(receiver.descriptor())
    assert sender.write("d", "empty", [], timeout=5.0).state is TransferState.SUCCESS
    assert receiver.wait_received("empty", timeout=5.0) is TransferState.SUCCESS
    assert_landed(sender, receiver, [], before)


def test_bad_calls(backend, make_engine):
    sender, receiver = make_engine(backend, "p"), make_engine(backend, "d", seed=3)
    handle = sender.write("d", "x", [(0, 0)], timeout=1.0)
    assert handle.state is TransferState.FAILED and "connect" in handle.error
    sender.connect(receiver.descriptor())
    with pytest.raises(ValueError, match="out of range"):
        sender.write("d", "x", [(0, 16)], timeout=1.0)
    with pytest.raises(ValueError, match="duplicate"):
        sender.write("d", "x", [(0, 1), (2, 1)], timeout=1.0)


def test_layout_mismatch_names_fields(backend, make_engine):
    sender = make_engine(backend, "p")
    other = make_engine(backend, "d", small_layout(head_dim=16, dtype=torch.float16))
    with pytest.raises(LayoutMismatch) as info:
        sender.connect(other.descriptor())
    message = str(info.value)
    assert "head_dim: local=8 remote=16" in message and "dtype: local=float32 remote=float16" in message
    assert "page_size" not in message
    assert sender.peer("d") is None


def test_peer_restart_and_dead_peer(backend, make_engine):
    sender = make_engine(backend, "p", seed=1)
    first = make_engine(backend, "d", seed=2)
    sender.connect(first.descriptor())
    sender.connect(first.descriptor())  # same epoch: no-op
    assert sender.write("d", "a", [(1, 1)], timeout=5.0).ok
    first.close()

    start = time.monotonic()
    dead = sender.write("d", "b", [(1, 2)], timeout=1.0)
    elapsed = time.monotonic() - start
    assert dead.state is TransferState.FAILED and dead.error
    assert elapsed < 2.0

    options = {"port": first.port} if backend == "tcp" else {}  # tcp: same endpoint again
    second = make_engine(backend, "d", seed=3, **options)
    assert second.epoch != first.epoch
    before = snapshot(second)
    stale = sender.write("d", "c", [(1, 3)], timeout=2.0)  # still holding the old epoch
    assert stale.state is TransferState.FAILED
    if backend == "tcp":  # same endpoint, new epoch: the receiver refuses, it does not trust
        assert "stale epoch" in stale.error
    assert second.received("c") is TransferState.WAITING_FOR_INPUT
    with pytest.raises(TransferError):  # the old descriptor cannot be connected any more
        make_engine(backend, "other").connect(first.descriptor(), timeout=1.0)
    sender.connect(second.descriptor())
    assert sender.peer("d").epoch == second.epoch
    handle = sender.write("d", "e", [(4, 5), (5, 6)], timeout=5.0)
    assert handle.ok, handle.error
    assert second.wait_received("e", timeout=5.0) is TransferState.SUCCESS
    assert_landed(sender, second, [(4, 5), (5, 6)], before)


def test_many_writes_sequential_and_concurrent(backend, make_engine):
    sender = make_engine(backend, "p", seed=1)
    receiver = make_engine(backend, "d", small_layout(num_blocks=32), seed=2)
    sender.connect(receiver.descriptor())
    gen = torch.Generator().manual_seed(7)
    for i in range(20):
        src = torch.randperm(16, generator=gen)[:3].tolist()
        dst = torch.randperm(32, generator=gen)[:3].tolist()
        handle = sender.write("d", f"seq-{i}", list(zip(src, dst)), timeout=5.0)
        assert handle.ok, handle.error
    assert all(receiver.wait_received(f"seq-{i}", 5.0) is TransferState.SUCCESS for i in range(20))

    before = snapshot(receiver)
    results: dict[str, object] = {}
    plan = {t: [(s, 16 * t + s) for s in range(16)] for t in range(2)}  # disjoint dst halves

    def worker(t: int) -> None:
        for j in range(8):
            pairs = plan[t][2 * j:2 * j + 2]
            results[f"thr-{t}-{j}"] = sender.write("d", f"thr-{t}-{j}", pairs, timeout=5.0)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 16 and all(h.ok for h in results.values()), results
    assert all(receiver.wait_received(tid, 5.0) is TransferState.SUCCESS for tid in results)
    assert_landed(sender, receiver, plan[0] + plan[1], before)
    assert sender.bytes_sent == receiver.bytes_received == (20 * 3 + 32) * PER_BLOCK


def test_a_write_the_receiver_gave_up_on_does_not_land(backend, make_engine):
    if backend not in ("tcp", "nccl"):
        pytest.skip("nixl writes one-sided: the receiver cannot refuse a late write (TransferEngine.forget)")
    sender = make_engine(backend, "prefill-0", seed=1)
    receiver = make_engine(backend, "decode-0", seed=2)
    sender.connect(receiver.descriptor())
    before = snapshot(receiver)
    receiver.forget("late")  # the decode side timed out and is about to free these blocks
    handle = sender.write("decode-0", "late", [(1, 2), (3, 4)], timeout=5.0)
    assert handle.state is TransferState.FAILED and "given up by the receiver" in handle.error
    assert all(map(torch.equal, before, receiver.memory.tensors))
    assert receiver.received("late") is TransferState.WAITING_FOR_INPUT
    assert sender.write("decode-0", "fresh", [(1, 2)], timeout=5.0).state is TransferState.SUCCESS
