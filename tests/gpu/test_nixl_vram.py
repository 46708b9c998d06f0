"""KV blocks move VRAM to VRAM between two processes on one GPU: nixl directly (UCX cuda_ipc),
cuda_ipc (the sender's own device copies into the receiver's IPC-mapped tensors), tcp through
host memory (the portable fallback).

Two spawned processes, as in tests/unit/transfer/test_multiprocess.py, each with an engine
`KVCache` on cuda:0 (seeded random contents) registered by `register_kv_cache`: the prefill
side writes scattered blocks into the decode side's, the decode side waits for the
notification and compares every block of every tensor exactly (written blocks against the
sender's seeded contents, all others against what they held before). A layout mismatch fails
at connect, naming the fields. With UCX_PROTO_INFO=y the sender's UCX prints the protocol it
chose for puts from cuda memory: it must name cuda_ipc.

Skipped without CUDA (conftest.py) and, per backend, when its modules do not import (the GPU
image lacks them: the transfer package imports pyzmq; nixl needs the nixl and nixl-cu13 wheels).
UCX_NET_DEVICES=lo, set before the children start as in the CPU tests, restricts UCX's network
devices only: cuda_ipc is an intra-node transport, so VRAM still moves over it.
"""
from __future__ import annotations

import os

os.environ.setdefault("UCX_NET_DEVICES", "lo")  # children inherit it

import functools  # noqa: E402
import multiprocessing as mp  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import Any, Optional  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

BACKENDS = ["nixl", "tcp", "cuda_ipc"]
LAYOUT = dict(num_layers=3, page_size=16, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16)
SENDER_BLOCKS, RECEIVER_BLOCKS = 24, 32
PAIRS = [(0, 31), (3, 30), (9, 2), (10, 3), (11, 4), (23, 0), (17, 17)]  # 9..11 -> 2..4 is one run
PER_BLOCK = 2 * 3 * 16 * 4 * 64 * 2
"""Bytes one block id moves: K and V x 3 layers x 16 tokens x 4 heads x 64 x bfloat16."""


# -- child processes (spawned: module-level, no pytest state) ----------------------------------
def _cache(num_blocks: int, seed: int, **overrides):
    from baton.services.engine.kv.kv_cache import KVCache, KVLayout

    cache = KVCache(KVLayout(num_blocks=num_blocks, **{**LAYOUT, **overrides}), torch.device("cuda", 0))
    gen = torch.Generator().manual_seed(seed)
    for tensor in (*cache.keys, *cache.values):
        tensor.copy_(torch.randn(tensor.shape, generator=gen).to(tensor.dtype))
    return cache


def _engine(backend: str, worker_id: str, num_blocks: int, seed: int, **overrides):
    torch.cuda.set_device(0)
    from baton.services.transfer import create_transfer_engine
    from baton.services.worker.kv_memory import register_kv_cache

    return create_transfer_engine(backend, worker_id, register_kv_cache(_cache(num_blocks, seed, **overrides)))


def _bad_blocks(source, got, before, pairs) -> list[tuple[int, int]]:
    """(tensor, block) of every receiver block that is not the sender's block written into it, or,
    when none was, not what it held before."""
    written, ns, nr = {d: s for s, d in pairs}, SENDER_BLOCKS, RECEIVER_BLOCKS
    bad = []
    for i, (src, now, old) in enumerate(zip(source, got, before, strict=True)):
        for b in range(nr):
            want = src.view(ns, -1)[written[b]] if b in written else old.view(nr, -1)[b]
            if not torch.equal(now.view(nr, -1)[b], want):
                bad.append((i, b))
    return bad


def receiver_main(backend: str, conn, sender_seed: int, transfer_id: Optional[str], pairs, overrides) -> None:
    """Serve; hand the descriptor to the parent; check what landed (unless `transfer_id` is None)."""
    from baton.services.worker.kv_memory import register_kv_cache

    engine = _engine(backend, "decode-vram", RECEIVER_BLOCKS, 99, **overrides)
    try:
        before = [t.clone() for t in engine.memory.tensors]
        conn.send(engine.descriptor().to_bytes())
        if transfer_id is not None:
            state = engine.wait_received(transfer_id, timeout=60.0)
            source = register_kv_cache(_cache(SENDER_BLOCKS, sender_seed)).tensors
            conn.send({"state": state.name, "bytes_received": engine.bytes_received,
                       "bad": _bad_blocks(source, engine.memory.tensors, before, pairs),
                       "device": str(engine.memory.device)})
        conn.recv()  # stay until the parent says so
    finally:
        engine.close()


def sender_main(backend: str, conn, seed: int) -> None:
    """Connect to the descriptor the parent sends (reporting how that went), then write on request."""
    from baton.services.transfer import PeerDescriptor

    engine = _engine(backend, "prefill-vram", SENDER_BLOCKS, seed)
    try:
        before = [t.clone() for t in engine.memory.tensors]
        peer = PeerDescriptor.from_bytes(conn.recv())
        try:
            engine.connect(peer, timeout=30.0)
        except Exception as exc:
            conn.send({"connect_error": f"{type(exc).__name__}: {exc}"})
            return
        conn.send({"connected": True})
        while (command := conn.recv()) is not None:
            transfer_id, pairs = command
            handle = engine.write(peer.worker_id, transfer_id, pairs, timeout=30.0)
            conn.send({"state": handle.state.name, "bytes": handle.bytes, "error": handle.error,
                       "source_unchanged": all(map(torch.equal, before, engine.memory.tensors))})
    finally:
        engine.close()
        import ctypes

        ctypes.CDLL(None).fflush(None)  # UCX logs through C stdio: let the parent read it now


# -- the parent ------------------------------------------------------------------------------
@functools.cache
def _import_error(backend: str) -> Optional[str]:
    """Why the children could not import what `backend` needs (checked in a fresh interpreter), or None."""
    modules = "zmq, nixl._api" if backend == "nixl" else "zmq"
    proc = subprocess.run([sys.executable, "-c", f"import {modules}"], capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]


def _require(backend: str) -> None:
    error = _import_error(backend)
    if error is not None:
        pytest.skip(f"{backend} cannot be imported here ({error}); carry its wheels")


def _run(backend: str, transfer_id: Optional[str], pairs=PAIRS, overrides=None) -> dict[str, Any]:
    """A receiver and a sender for `backend`; the descriptor passed on; one write of `pairs` as
    `transfer_id` when the connect worked. Returns what the children reported and their exit codes."""
    ctx = mp.get_context("spawn")
    recv_parent, recv_child = ctx.Pipe()
    send_parent, send_child = ctx.Pipe()
    procs = [ctx.Process(target=receiver_main, args=(backend, recv_child, 11, transfer_id, pairs, overrides or {})),
             ctx.Process(target=sender_main, args=(backend, send_child, 11))]
    for proc in procs:
        proc.start()
    try:
        assert recv_parent.poll(180), "receiver did not start"
        got: dict[str, Any] = {"descriptor": recv_parent.recv()}
        send_parent.send(got["descriptor"])
        assert send_parent.poll(180), "sender did not answer the connect"
        got["connect"] = send_parent.recv()
        if "connected" in got["connect"] and transfer_id is not None:
            send_parent.send((transfer_id, pairs))
            assert send_parent.poll(120), "sender did not answer the write"
            got["write"] = send_parent.recv()
            assert recv_parent.poll(120), "receiver did not report"
            got["received"] = recv_parent.recv()
        for conn in (send_parent, recv_parent):
            try:
                conn.send(None)
            except OSError:
                pass  # that child is already done
        for proc in procs:
            proc.join(60)
        got["exitcodes"] = [proc.exitcode for proc in procs]
        return got
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vram_blocks_land_exactly_across_processes(backend):
    _require(backend)
    from baton.services.transfer import PeerDescriptor
    from baton.services.transfer.nixl import unpack_metadata

    got = _run(backend, "vram-1")

    peer = PeerDescriptor.from_bytes(got["descriptor"])
    if backend == "nixl":
        info = unpack_metadata(peer.metadata)
        assert (info.mem_type, info.device_id) == ("VRAM", 0)
    assert got["connect"] == {"connected": True}
    expected = len(PAIRS) * PER_BLOCK
    assert got["write"] == {"state": "SUCCESS", "bytes": expected, "error": None, "source_unchanged": True}
    assert got["received"] == {"state": "SUCCESS", "bytes_received": expected, "bad": [], "device": "cuda:0"}
    assert got["exitcodes"] == [0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_mismatch_fails_loudly_on_gpu(backend):
    _require(backend)
    got = _run(backend, None, overrides={"head_dim": 128, "dtype": torch.float16})

    error = got["connect"].get("connect_error", "")
    assert error.startswith("LayoutMismatch: "), got["connect"]
    assert "decode-vram" in error and "kv.head_dim: local=64 remote=128" in error, error
    assert "kv.dtype: local=bfloat16 remote=float16" in error, error
    assert got["exitcodes"] == [0, 0]


_LOG_LINE = re.compile(r"^\[[\d.]+\] \[[^:\]]*:(\d+):(\d+)\]\s*(.*)$")


def put_tables(log: str) -> list[str]:
    """The protocol tables UCX printed (UCX_PROTO_INFO=y) for puts from cuda memory to a peer (not
    to the agent's own loopback endpoint, "self cfg"), each as text from its title line. Lines are
    grouped by process and UCX thread first, so tables printed at the same time do not mix."""
    streams: dict[tuple[str, str], list[str]] = {}
    for line in log.splitlines():
        if match := _LOG_LINE.match(line):
            streams.setdefault(match.group(1, 2), []).append(match.group(3))
    tables = []
    for lines in streams.values():
        for i, line in enumerate(lines):
            if re.search(r"ucp_put\S* from cuda", line):
                end, borders = i + 1, 0
                while end < len(lines) and borders < 3:  # under the title, under the header, after the rows
                    borders += lines[end].startswith("+")
                    end += 1
                if "self cfg" not in lines[max(0, i - 1)]:
                    tables.append("\n".join(lines[max(0, i - 1):end]))
    return tables


def test_nixl_vram_puts_go_over_cuda_ipc(monkeypatch, capfd):
    _require("nixl")
    monkeypatch.setenv("UCX_PROTO_INFO", "y")  # the children inherit it
    got = _run("nixl", "vram-ipc")

    assert got["write"]["state"] == "SUCCESS" and got["received"]["bad"] == [], got
    tables = put_tables(capfd.readouterr().out)
    if not tables:
        pytest.skip("UCX printed no protocol table for puts from cuda memory (UCX_PROTO_INFO not honoured?)")
    assert any("cuda_ipc" in table for table in tables), "\n\n".join(tables)
