"""KV transfer bandwidth and per-request hand-off latency, per backend, vs a local copy in the same run.

A *block* is one page of one layer's K plus V (2 * `block_bytes(layout)`): 1 layer, 8 KV
heads x 128, float16 (4 KiB of K+V per token), so the page size sets it: 4 tokens = 16 KiB
... 1024 tokens = 4 MiB. Each write moves `--blocks` (16) blocks, a typical request, as
scattered (src, dst) pairs (none consecutive, so NIXL coalesces nothing) of a 2x pool.

Sender and receiver are separate spawned processes (real loopback path; NIXL on
UCX_NET_DEVICES=lo, where UCX still picks its same-host shared-memory/CMA transports unless
UCX_TLS=tcp) sharing CLOCK_MONOTONIC, so the receiver's `wait_received` SUCCESS time
compares with the sender's clock.
- bandwidth: bytes / time of a batch of >= 8 writes moving >= `--total-mib` (fewer if
  the warm-up says it would pass `--cap-s`), up to the later of the last SUCCESS at either end;
  GB/s = 1e9 bytes/s.
- hand-off: single writes, from write() to the later of SUCCESS at the sender and at the
  receiver (p50, p90); "write() p50" is the sender's SUCCESS alone.
- reference ("memcpy"): the same pairs in one process, index_select into a contiguous
  (preallocated, reused: no page faults) buffer plus index_copy_ into the destination, measured alike.
Every destination is checked to hold the source blocks' pattern afterwards, and every other
destination block to be untouched.

`--device cuda` puts both KV caches (sender's and receiver's, still two processes) in VRAM of
GPU 0: nixl writes VRAM to VRAM (UCX's cuda_ipc, an intra-node transport that
UCX_NET_DEVICES does not restrict; UCX_TLS, if set, must keep cuda_ipc and cuda_copy), tcp
stages the blocks through host memory, and the reference ("d2d") is the same index_select +
index_copy_ between two CUDA tensors in one process (indices already on the GPU), each move
timed to torch.cuda.synchronize(). A backend whose modules are missing (the transfer package
needs pyzmq; nixl its wheels) is skipped with a note.

    .venv/bin/python -m baton.bench.kv_transfer                  # tcp and nixl, 16 KiB .. 4 MiB
    .venv/bin/python -m baton.bench.kv_transfer --quick          # smoke run: 2 sizes, small totals
    .venv/bin/python -m baton.bench.kv_transfer --results bench/RESULTS.md
    python3 -m baton.bench.kv_transfer --device cuda --json $OUT/kv_transfer_cuda.json

`--backends nccl` runs on the CPU over gloo here; on CUDA it needs two GPUs: `--two-gpus` measures one
8B-shaped request (2k and 8k tokens) GPU 0 -> GPU 1 per backend against `copy_` of the same bytes
(bench/kv_transfer_gpus.py):

    python3 -m baton.bench.kv_transfer --two-gpus --backends nccl --tokens 2048,8192 --json $OUT/kv_nccl.json
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ.setdefault("UCX_NET_DEVICES", "lo")  # before anything imports nixl (children inherit it)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from baton.bench.kv_transfer_report import REFERENCE, append_section, summary, table  # noqa: E402
from baton.bench.machine import describe_machine  # noqa: E402

from baton.services.engine.kv.kv_cache import KVCache, KVLayout  # noqa: E402
from baton.services.worker.kv_memory import register_kv_cache  # noqa: E402

TOKEN_BYTES = 2 * 8 * 128 * 2  # K+V bytes of one token of the 1-layer layout (8 heads x 128 x float16)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m baton.bench.kv_transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="tcp,nixl", help="comma-separated transfer backends (tcp, nixl, cuda_ipc, nccl)")
    p.add_argument("--two-gpus", action="store_true", help="one 8B-shaped request GPU 0 -> GPU 1 per backend vs copy_ "
                   "between the GPUs (bench/kv_transfer_gpus.py; --tokens, --samples, --warmup apply)")
    p.add_argument("--tokens", default="2048,8192", help="--two-gpus: request lengths in tokens (multiples of 16)")
    p.add_argument("--chunk-mib", type=float, default=64.0, help="--two-gpus: the nccl backend's chunk (MiB per message)")
    p.add_argument("--device", choices=sorted(REFERENCE), default="cpu",
                   help="where both KV caches live: cpu (host memory) or cuda (VRAM of GPU 0)")
    p.add_argument("--sizes", default="16K,64K,256K,1M,4M", help="block sizes (K+V of one page, one layer)")
    p.add_argument("--blocks", type=int, default=16, help="blocks per write (one request)")
    p.add_argument("--total-mib", type=float, default=None, help="bytes per bandwidth batch, in MiB "
                   "(default 64; 1024 on cuda)")
    p.add_argument("--samples", type=int, default=30, help="hand-off latency samples per point")
    p.add_argument("--warmup", type=int, default=3, help="warm-up writes per point")
    p.add_argument("--cap-s", type=float, default=2.5, help="rough time cap of each batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    p.add_argument("--results", default="", help="append a markdown section to this file")
    p.add_argument("--json", default="", help="also write the result (command, machine, rows) to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke run: 16K and 256K, 4 MiB batches, 5 samples")
    args = p.parse_args(argv)
    if args.total_mib is None:
        args.total_mib = 1024 if args.device == "cuda" else 64
    if args.quick:
        args.sizes, args.total_mib, args.samples, args.warmup, args.cap_s = "16K,256K", 4, 5, 2, 0.5
    units = {"K": 2**10, "M": 2**20}
    args.size_list = [int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)
                      for s in args.sizes.split(",")]
    args.backend_list = [b for b in args.backends.split(",") if b]
    args.token_list = [int(t) for t in args.tokens.split(",") if t]
    if args.two_gpus:
        gpus = 2 if os.environ.get("BATON_BENCH_DRY_RUN") == "1" else torch.cuda.device_count()
        if gpus < 2 or any(t <= 0 or t % 16 for t in args.token_list):
            p.error("--two-gpus needs two CUDA GPUs and --tokens in positive multiples of 16")
        return args
    if any(s <= 0 or s % TOKEN_BYTES for s in args.size_list) or min(args.blocks, args.samples, args.warmup,
                                                                     args.threads) < 1:
        p.error(f"need block sizes in multiples of {TOKEN_BYTES} bytes and positive counts")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
    return args


def device_of(args) -> torch.device:
    """GPU 0 (the first visible) or the CPU; on CUDA also made this process's current device."""
    if args.device != "cuda":
        return torch.device("cpu")
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unavailable(backend: str, device: str = "cpu") -> Optional[str]:
    """Why `backend` cannot run here (a module it needs is not installed, or cuda_ipc off CUDA), or None."""
    if backend == "cuda_ipc" and device != "cuda":
        return "cuda_ipc: moves CUDA memory only (run with --device cuda)"
    if backend == "nccl" and device == "cuda":
        return "nccl: NCCL cannot connect two processes on one GPU (run with --two-gpus)"
    need = {"zmq": "pyzmq (the transfer package imports it)", "nixl": "nixl (the nixl and nixl-cu13 wheels)"}
    missing = [why for module, why in need.items()
               if (module == "zmq" or backend == "nixl") and importlib.util.find_spec(module) is None]
    return f"{backend}: {' and '.join(missing)} not importable" if missing else None


def layout_for(size: int, blocks: int) -> KVLayout:
    return KVLayout(num_layers=1, num_blocks=2 * blocks, page_size=size // TOKEN_BYTES, num_kv_heads=8,
                    head_dim=128, dtype=torch.float16)


def pairs_for(blocks: int) -> list[tuple[int, int]]:
    """src = even blocks, dst = odd blocks in reverse: scattered on both sides."""
    return [(2 * i, 2 * (blocks - 1 - i) + 1) for i in range(blocks)]


def pattern_cache(layout: KVLayout, device: torch.device = torch.device("cpu")) -> KVCache:
    """K block b filled with b+1, V block b with -(b+1) (cheap, and any misplaced block shows)."""
    cache, n = KVCache(layout, device), layout.num_blocks
    for sign, tensor in ((1, cache.keys[0]), (-1, cache.values[0])):
        tensor.view(n, -1).copy_(sign * torch.arange(1, n + 1, device=device)[:, None])
    return cache


def verify(cache: KVCache, pairs: list[tuple[int, int]]) -> bool:
    """Each dst block holds its src block's pattern; every other block is still zero (as KVCache made it)."""
    n, written = cache.layout.num_blocks, {d: s for s, d in pairs}
    return all(bool((t.view(n, -1)[b] == (sign * (written[b] + 1) if b in written else 0)).all())
               for b in range(n) for sign, t in ((1, cache.keys[0]), (-1, cache.values[0])))


def counts(per_write_s: float, write_bytes: int, args) -> tuple[int, int]:
    """Writes in the bandwidth batch and latency samples, both held to about --cap-s."""
    fit = int(args.cap_s / max(per_write_s, 1e-6))
    wanted = -(-int(args.total_mib * 2**20) // write_bytes)
    return max(1, min(max(8, wanted), fit)), max(min(5, args.samples), min(args.samples, fit))


def row(backend, size, args, writes, nbytes, received, seconds, lat, verified) -> dict[str, Any]:
    """`lat`: (write() to sender SUCCESS, write() to SUCCESS at both ends) per sample, seconds."""
    ms = {f"{k}{q}_ms": 1e3 * float(np.percentile([t[i] for t in lat], q))
          for i, k in ((0, "write_p"), (1, "p")) for q in (50, 90)}
    return {"backend": backend, "block_bytes": size, "blocks_per_write": args.blocks, "writes": writes,
            "bytes": nbytes, "bytes_received": received, "expected_bytes": writes * args.blocks * size,
            "seconds": seconds, "gbps": nbytes / seconds / 1e9, "samples": len(lat), **ms, "verified": verified}


def reference_row(size: int, args) -> dict[str, Any]:
    """The local reference: the same pairs moved inside one process ("memcpy" on CPU, "d2d" on CUDA)."""
    device = device_of(args)
    layout, pairs = layout_for(size, args.blocks), pairs_for(args.blocks)
    src, dst, n = pattern_cache(layout, device), KVCache(layout, device), layout.num_blocks
    buf = torch.empty((args.blocks, src.keys[0].numel() // n), dtype=layout.dtype, device=device)  # reused
    prebuilt = [torch.tensor(ids, dtype=torch.long, device=device) for ids in zip(*pairs)]  # used on CUDA

    def move() -> tuple[float, float]:
        start = time.monotonic()
        si, di = prebuilt if device.type == "cuda" else (torch.tensor(ids, dtype=torch.long) for ids in zip(*pairs))
        for a, b in ((src.keys[0], dst.keys[0]), (src.values[0], dst.values[0])):
            b.view(n, -1).index_copy_(0, di, torch.index_select(a.view(n, -1), 0, si, out=buf))
        sync(device)
        return (time.monotonic() - start,) * 2

    bw_n, lat_n = counts(statistics.median(move()[0] for _ in range(args.warmup)), args.blocks * size, args)
    start = time.monotonic()
    for _ in range(bw_n):
        move()
    seconds, nbytes = time.monotonic() - start, bw_n * args.blocks * size
    lat = [move() for _ in range(lat_n)]
    return row(REFERENCE[args.device], size, args, bw_n, nbytes, nbytes, seconds, lat, verify(dst, pairs))


def _receiver(backend: str, args, peer) -> None:
    """One engine per size; waits for each phase's transfers announced by the sender, reports times."""
    torch.set_num_threads(args.threads)
    device = device_of(args)
    from baton.services.transfer import TransferState, create_transfer_engine
    for size in args.size_list:
        cache = KVCache(layout_for(size, args.blocks), device)
        engine = create_transfer_engine(backend, "bench-decode", register_kv_cache(cache))
        peer.send(engine.descriptor().to_bytes())
        while (msg := peer.recv())[0] != "verify":
            (name, count), before = msg, engine.bytes_received
            for i in range(count):
                state, seen = engine.wait_received(f"{name}-{i}", timeout=60.0), time.monotonic()
                if state is not TransferState.SUCCESS:
                    raise RuntimeError(f"{backend} receiver: {name}-{i} ended {state.name}")
                engine.forget(f"{name}-{i}")
                if name != "bw":
                    peer.send(seen)
            if name == "bw":
                peer.send((seen, engine.bytes_received - before))
        peer.send(verify(cache, pairs_for(args.blocks)))
        engine.close()


def _sender(backend: str, args, peer, out) -> None:
    """Per size: connect, warm up, time the bandwidth batch and single hand-offs; rows go to `out`."""
    try:
        torch.set_num_threads(args.threads)
        device = device_of(args)
        from baton.services.transfer import PeerDescriptor, create_transfer_engine
        pairs = pairs_for(args.blocks)
        for size in args.size_list:
            engine = create_transfer_engine(backend, "bench-prefill",
                                            register_kv_cache(pattern_cache(layout_for(size, args.blocks), device)))
            desc = PeerDescriptor.from_bytes(peer.recv())
            engine.connect(desc, timeout=30.0)

            def write(tid: str) -> tuple[float, float, int]:
                start = time.monotonic()
                handle = engine.write(desc.worker_id, tid, pairs, timeout=60.0)
                if not handle.ok:
                    raise RuntimeError(f"{backend} write {tid}: {handle.error}")
                return start, time.monotonic(), handle.bytes

            def handoffs(name: str, count: int) -> list[tuple[float, float]]:
                peer.send((name, count))
                return [(done - start, max(done, peer.recv()) - start)
                        for start, done, _ in (write(f"{name}-{i}") for i in range(count))]

            warm = statistics.median(t for _, t in handoffs("warm", args.warmup))
            bw_n, lat_n = counts(warm, args.blocks * size, args)
            peer.send(("bw", bw_n))
            start = time.monotonic()
            nbytes = sum(write(f"bw-{i}")[2] for i in range(bw_n))
            done = time.monotonic()
            seen, received = peer.recv()
            lat = handoffs("lat", lat_n)
            peer.send(("verify",))
            out.send(row(backend, size, args, bw_n, nbytes, received, max(done, seen) - start, lat, peer.recv()))
            engine.close()
        out.send(None)
    except BaseException:
        out.send(traceback.format_exc())


def run_backend(backend: str, args, receiver=None, sender=None, timeout_s: float = 180) -> list[dict[str, Any]]:
    """Spawn a receiver and a sender for `backend` (this module's, or the given module-level
    functions, e.g. the two-GPU mode's); collect the rows the sender sends, up to None."""
    ctx = mp.get_context("spawn")
    peer_a, peer_b = ctx.Pipe()
    out_r, out_w = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=receiver or _receiver, args=(backend, args, peer_a), daemon=True),
             ctx.Process(target=sender or _sender, args=(backend, args, peer_b, out_w), daemon=True)]
    for proc in procs:
        proc.start()
    for conn in (peer_a, peer_b, out_w):
        conn.close()  # the children hold them now: a dead peer shows as EOF
    rows: list[dict[str, Any]] = []
    try:
        while (item := out_r.recv() if out_r.poll(timeout_s) else f"no result within {timeout_s:.0f} s") is not None:
            if isinstance(item, str):
                raise RuntimeError(f"{backend} sender failed:\n{item}")
            rows.append(item)
        return rows
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def machine(args) -> str:
    if args.device != "cuda":
        return describe_machine()
    try:
        nixl = f", nixl {importlib.metadata.version('nixl')}"
    except importlib.metadata.PackageNotFoundError:
        nixl = ""
    return describe_machine(f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}{nixl}")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark; prints the table, optionally appends to --results / writes --json; returns the result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.two_gpus:
        from baton.bench.kv_transfer_gpus import run
        rows = run(args)
        gpus = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
                if torch.cuda.is_available() else "dry run on the CPU")
        result = {"command": f"python3 -m baton.bench.kv_transfer {shlex.join(argv)}", "machine": describe_machine(gpus),
                  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "rows": rows}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return result
    rows = [reference_row(size, args) for size in args.size_list]
    skipped = [why for backend in args.backend_list if (why := unavailable(backend, args.device))]
    for why in skipped:
        print(f"skipped {why}", file=sys.stderr)
    for backend in args.backend_list:
        if unavailable(backend, args.device) is None:
            rows += run_backend(backend, args)
    ref = {r["block_bytes"]: r["gbps"] for r in rows if r["backend"] == REFERENCE[args.device]}
    for r in rows:
        r["ratio"] = r["gbps"] / ref[r["block_bytes"]]
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    result = {"command": f"{exe} -m baton.bench.kv_transfer {shlex.join(argv)}".strip(), "machine": machine(args),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "device": args.device, "reference": REFERENCE[args.device], "skipped": skipped,
              "ucx": {k: os.environ.get(k, "") for k in ("UCX_TLS", "UCX_NET_DEVICES")}, "rows": rows}
    print(table(rows, args.device), summary(rows, args), sep="\n\n")
    if any(not r["verified"] or r["expected_bytes"] != r["bytes"] or r["expected_bytes"] != r["bytes_received"]
           for r in rows):
        print("WARNING: some rows moved unexpected bytes or failed verification", file=sys.stderr)
    if args.results:
        append_section(args.results, result, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
