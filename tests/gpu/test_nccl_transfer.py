"""The nccl transfer backend on CUDA: KV blocks VRAM to VRAM between two processes on two GPUs over
NCCL, a receiver killed mid-transfer fails the sender within the write's deadline and leaves it
able to serve another peer, and disaggregated prefill (GPU 0) -> decode (GPU 1) equals colocated
token for token. On one GPU: two processes on the same GPU are refused at the handshake with a
clear error (NCCL cannot connect them), and the gloo group moves CUDA memory staged through the host
(and refuses a write the receiver gave up on while it was in flight).

Skipped without CUDA (conftest.py), without pyzmq (the transfer package imports it; carry its
wheel) and, for the two-GPU tests, with fewer than two GPUs. Children are spawned (module-level
bodies, no pytest state), one per GPU, both seeing every GPU.
"""
from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("zmq") is None,
                                reason="the transfer package needs pyzmq (carry its wheel)")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")

LAYOUT = dict(num_layers=3, page_size=16, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16)
BLOCKS = 32
PAIRS = [(0, 31), (3, 30), (9, 2), (10, 3), (11, 4), (23, 0), (17, 17)]
ALL = [(s, BLOCKS - 1 - s) for s in range(BLOCKS)]


# -- child processes ------------------------------------------------------------------------
def _engine(worker_id: str, gpu: int, seed: int, group_backend: str = "auto"):
    torch.cuda.set_device(gpu)
    from baton.services.engine.kv.kv_cache import KVCache, KVLayout
    from baton.services.transfer import create_transfer_engine
    from baton.services.worker.kv_memory import register_kv_cache

    cache = KVCache(KVLayout(num_blocks=BLOCKS, **LAYOUT), torch.device("cuda", gpu))
    gen = torch.Generator().manual_seed(seed)
    for tensor in (*cache.keys, *cache.values):
        tensor.copy_(torch.randn(tensor.shape, generator=gen).to(tensor.dtype))
    return create_transfer_engine("nccl", worker_id, register_kv_cache(cache), group_backend=group_backend)


def _bad_blocks(source, got, before, pairs) -> list[tuple[int, int]]:
    written, n = {d: s for s, d in pairs}, BLOCKS
    return [(i, b) for i, (src, now, old) in enumerate(zip(source, got, before, strict=True)) for b in range(n)
            if not torch.equal(now.view(n, -1)[b].cpu(),
                               (src.view(n, -1)[written[b]] if b in written else old.view(n, -1)[b]).cpu())]


def receiver_main(conn, gpu: int, sender_seed: int, transfer_id: str, pairs) -> None:
    """Check one write; then accept the next announcement, receive nothing and die 0.3 s later."""
    rx = _engine("decode-gpu", gpu, seed=99)
    before = [t.clone() for t in rx.memory.tensors]
    conn.send(rx.descriptor().to_bytes())
    state = rx.wait_received(transfer_id, timeout=60.0)
    source = _engine("source-copy", gpu, seed=sender_seed).memory.tensors
    bad = _bad_blocks(source, rx.memory.tensors, before, pairs)

    def accept_then_die(header, payload):
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL)).start()
        return [b"ok"]
    rx._receive_data = accept_then_die
    conn.send({"state": state.name, "bad": bad})
    conn.recv()


def sender_main(conn, gpu: int, seed: int) -> None:
    """Connect to each descriptor the parent sends and write on request; report every outcome."""
    from baton.services.transfer import PeerDescriptor

    tx = _engine("prefill-gpu", gpu, seed=seed)
    while (command := conn.recv()) is not None:
        descriptor, transfer_id, pairs, timeout = command
        peer = PeerDescriptor.from_bytes(descriptor)
        start = time.monotonic()
        try:
            tx.connect(peer, timeout=60.0)
            handle = tx.write(peer.worker_id, transfer_id, pairs, timeout=timeout)
            conn.send({"state": handle.state.name, "error": handle.error, "elapsed": time.monotonic() - start})
        except Exception as exc:
            conn.send({"state": "FAILED", "error": f"{type(exc).__name__}: {exc}", "elapsed": 0.0})
    tx.close()


def plain_receiver_main(conn, gpu: int, sender_seed: int, transfer_id: str, pairs) -> None:
    rx = _engine("decode-gpu-2", gpu, seed=98)
    before = [t.clone() for t in rx.memory.tensors]
    conn.send(rx.descriptor().to_bytes())
    state = rx.wait_received(transfer_id, timeout=60.0)
    source = _engine("source-copy", gpu, seed=sender_seed).memory.tensors
    conn.send({"state": state.name, "bad": _bad_blocks(source, rx.memory.tensors, before, pairs)})
    conn.recv()
    rx.close()


# -- tests ----------------------------------------------------------------------------------
def _spawn(target, *args):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    return proc, parent


def _reply(conn, timeout: float = 120.0):
    assert conn.poll(timeout), "child did not answer"
    return conn.recv()


@two_gpus
def test_nccl_moves_blocks_between_two_gpus_and_survives_a_receiver_killed_mid_transfer():
    procs = []
    try:
        receiver, rx = _spawn(receiver_main, 1, 11, "gpu-1", PAIRS)
        sender, tx = _spawn(sender_main, 0, 11)
        procs += [receiver, sender]
        descriptor = _reply(rx)
        tx.send((descriptor, "gpu-1", PAIRS, 60.0))
        assert _reply(tx)["state"] == "SUCCESS"
        assert _reply(rx) == {"state": "SUCCESS", "bad": []}

        tx.send((descriptor, "gpu-2", ALL, 5.0))  # accepted, then the receiver dies
        dead = _reply(tx)
        assert dead["state"] == "FAILED" and dead["error"], dead
        assert dead["elapsed"] < 8.0, dead  # within the write's deadline (NCCL sees no closed socket)

        second, rx2 = _spawn(plain_receiver_main, 1, 11, "gpu-3", PAIRS)  # the sender process lives on
        procs.append(second)
        tx.send((_reply(rx2), "gpu-3", PAIRS, 60.0))
        assert _reply(tx)["state"] == "SUCCESS"
        assert _reply(rx2) == {"state": "SUCCESS", "bad": []}
        rx2.send("done")
        tx.send(None)
        sender.join(30)
        assert sender.exitcode == 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(10)


def test_two_processes_on_one_gpu_are_refused_clearly():
    from baton.services.transfer import TransferError

    a, b = _engine("a", 0, seed=1), _engine("b", 0, seed=2)
    try:
        with pytest.raises(TransferError, match="NCCL cannot connect two processes on one GPU"):
            a.connect(b.descriptor())
    finally:
        a.close()
        b.close()


def test_the_gloo_group_moves_cuda_memory_staged_through_the_host():
    a, b = _engine("a", 0, seed=1, group_backend="gloo"), _engine("b", 0, seed=2, group_backend="gloo")
    try:
        before = [t.clone() for t in b.memory.tensors]
        a.connect(b.descriptor())
        handle = a.write("b", "g-1", PAIRS, timeout=30.0)
        assert handle.ok, handle.error
        assert b.wait_received("g-1", 10.0).name == "SUCCESS"
        assert _bad_blocks(a.memory.tensors, b.memory.tensors, before, PAIRS) == []
    finally:
        a.close()
        b.close()


def test_a_cuda_write_in_flight_when_the_receiver_gives_up_does_not_land():
    """The fence on device memory (gloo group, one GPU): forgotten between announcement and bytes."""
    from baton.services.transfer.nccl import NcclTransferEngine

    class ForgetsInFlight(NcclTransferEngine):
        def _send_and_commit(self, link, group, transfer_id, src, deadline):
            receiver.forget(transfer_id)
            return super()._send_and_commit(link, group, transfer_id, src, deadline)

    sender = _engine("a", 0, seed=1, group_backend="gloo")
    receiver = _engine("b", 0, seed=2, group_backend="gloo")
    tx = ForgetsInFlight("a2", sender.memory, group_backend="gloo", chunk_bytes=2 * sender.bytes_per_block)
    try:
        before = [t.clone() for t in receiver.memory.tensors]
        tx.connect(receiver.descriptor())
        handle = tx.write("b", "late", PAIRS, timeout=30.0)
        assert handle.state.name == "FAILED" and "given up by the receiver" in handle.error
        assert all(torch.equal(x, y) for x, y in zip(before, receiver.memory.tensors))
    finally:
        for engine in (tx, sender, receiver):
            engine.close()


@two_gpus
def test_disaggregated_over_nccl_on_two_gpus_equals_colocated(tmp_path, monkeypatch):
    from baton.services.engine import LLM, SamplingParams
    from tests.helpers.grpc_client import decode_generate
    from tests.helpers.tiny_models import VOCAB, make_tiny_model
    from tests.helpers.workers import start_worker

    model = make_tiny_model("llama", tmp_path / "model")
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [[(7 * i + j) % (VOCAB - 3) + 3 for j in range(n)] for i, n in enumerate((1, 5, 53, 70, 130))]
    workers = []
    try:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
        workers.append(start_worker("prefill", model, tmp_path, transfer="nccl"))
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
        workers.append(start_worker("decode", model, tmp_path, transfer="nccl"))
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        prefill, decode = workers

        async def run_all():
            return await asyncio.gather(*(decode_generate(decode.address, p, greedy, prefill=prefill.address)
                                          for p in prompts))
        got = [r[0].token_ids for r in asyncio.run(run_all())]
        expected = LLM(model=str(model), page_size=4, kv_cache_tokens=4096).generate(prompts, greedy)
        assert got == [r.outputs[0].token_ids for r in expected]
        assert prefill.metric("baton_kv_transfer_bytes_total", direction="out") > 0
        assert "transfer nccl" in decode.log()
    finally:
        for worker in reversed(workers):
            worker.stop()
