"""KV transfer bandwidth and per-request hand-off latency, per backend, vs a local memory copy.

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
- memcpy: the same pairs in one process, index_select into a contiguous (preallocated,
  reused: no page faults) buffer plus index_copy_ into the destination, measured alike.
Every destination is checked to hold the source blocks' pattern afterwards.

    .venv/bin/python -m baton.bench.kv_transfer                  # tcp and nixl, 16 KiB .. 4 MiB
    .venv/bin/python -m baton.bench.kv_transfer --quick          # smoke run: 2 sizes, small totals
    .venv/bin/python -m baton.bench.kv_transfer --results bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime
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

from baton.bench.machine import describe_machine  # noqa: E402

from baton.services.engine.kv.kv_cache import KVCache, KVLayout  # noqa: E402
from baton.services.worker.kv_memory import register_kv_cache  # noqa: E402

TOKEN_BYTES = 2 * 8 * 128 * 2  # K+V bytes of one token of the 1-layer layout (8 heads x 128 x float16)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m baton.bench.kv_transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="tcp,nixl", help="comma-separated transfer backends")
    p.add_argument("--sizes", default="16K,64K,256K,1M,4M", help="block sizes (K+V of one page, one layer)")
    p.add_argument("--blocks", type=int, default=16, help="blocks per write (one request)")
    p.add_argument("--total-mib", type=float, default=64, help="bytes per bandwidth batch, in MiB")
    p.add_argument("--samples", type=int, default=30, help="hand-off latency samples per point")
    p.add_argument("--warmup", type=int, default=3, help="warm-up writes per point")
    p.add_argument("--cap-s", type=float, default=2.5, help="rough time cap of each batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    p.add_argument("--results", default="", help="append a markdown section to this file")
    p.add_argument("--quick", action="store_true", help="smoke run: 16K and 256K, 4 MiB batches, 5 samples")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.total_mib, args.samples, args.warmup, args.cap_s = "16K,256K", 4, 5, 2, 0.5
    units = {"K": 2**10, "M": 2**20}
    args.size_list = [int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)
                      for s in args.sizes.split(",")]
    args.backend_list = [b for b in args.backends.split(",") if b]
    if any(s <= 0 or s % TOKEN_BYTES for s in args.size_list) or min(args.blocks, args.samples, args.warmup,
                                                                     args.threads) < 1:
        p.error(f"need block sizes in multiples of {TOKEN_BYTES} bytes and positive counts")
    return args


def layout_for(size: int, blocks: int) -> KVLayout:
    return KVLayout(num_layers=1, num_blocks=2 * blocks, page_size=size // TOKEN_BYTES, num_kv_heads=8,
                    head_dim=128, dtype=torch.float16)


def pairs_for(blocks: int) -> list[tuple[int, int]]:
    """src = even blocks, dst = odd blocks in reverse: scattered on both sides."""
    return [(2 * i, 2 * (blocks - 1 - i) + 1) for i in range(blocks)]


def pattern_cache(layout: KVLayout) -> KVCache:
    """K block b filled with b+1, V block b with -(b+1) (cheap, and any misplaced block shows)."""
    cache, n = KVCache(layout, torch.device("cpu")), layout.num_blocks
    for sign, tensor in ((1, cache.keys[0]), (-1, cache.values[0])):
        tensor.view(n, -1).copy_(sign * torch.arange(1, n + 1)[:, None])
    return cache


def verify(cache: KVCache, pairs: list[tuple[int, int]]) -> bool:
    n = cache.layout.num_blocks
    return all(bool((t.view(n, -1)[d] == sign * (s + 1)).all())
               for s, d in pairs for sign, t in ((1, cache.keys[0]), (-1, cache.values[0])))


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


def memcpy_row(size: int, args) -> dict[str, Any]:
    """The local reference: the same pairs moved inside one process."""
    layout, pairs = layout_for(size, args.blocks), pairs_for(args.blocks)
    src, dst, n = pattern_cache(layout), KVCache(layout, torch.device("cpu")), layout.num_blocks
    buf = torch.empty((args.blocks, src.keys[0].numel() // n), dtype=layout.dtype)  # staging, reused

    def move() -> tuple[float, float]:
        start = time.monotonic()
        si, di = (torch.tensor(ids, dtype=torch.long) for ids in zip(*pairs))
        for a, b in ((src.keys[0], dst.keys[0]), (src.values[0], dst.values[0])):
            b.view(n, -1).index_copy_(0, di, torch.index_select(a.view(n, -1), 0, si, out=buf))
        return (time.monotonic() - start,) * 2

    bw_n, lat_n = counts(statistics.median(move()[0] for _ in range(args.warmup)), args.blocks * size, args)
    start = time.monotonic()
    for _ in range(bw_n):
        move()
    seconds, nbytes = time.monotonic() - start, bw_n * args.blocks * size
    lat = [move() for _ in range(lat_n)]
    return row("memcpy", size, args, bw_n, nbytes, nbytes, seconds, lat, verify(dst, pairs))


def _receiver(backend: str, args, peer) -> None:
    """One engine per size; waits for each phase's transfers announced by the sender, reports times."""
    torch.set_num_threads(args.threads)
    from baton.services.transfer import TransferState, create_transfer_engine
    for size in args.size_list:
        cache = KVCache(layout_for(size, args.blocks), "cpu")
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
        from baton.services.transfer import PeerDescriptor, create_transfer_engine
        pairs = pairs_for(args.blocks)
        for size in args.size_list:
            engine = create_transfer_engine(backend, "bench-prefill",
                                            register_kv_cache(pattern_cache(layout_for(size, args.blocks))))
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


def run_backend(backend: str, args) -> list[dict[str, Any]]:
    """Spawn a receiver and a sender for `backend`; collect one row per block size."""
    ctx = mp.get_context("spawn")
    peer_a, peer_b = ctx.Pipe()
    out_r, out_w = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=_receiver, args=(backend, args, peer_a), daemon=True),
             ctx.Process(target=_sender, args=(backend, args, peer_b, out_w), daemon=True)]
    for proc in procs:
        proc.start()
    for conn in (peer_a, peer_b, out_w):
        conn.close()  # the children hold them now: a dead peer shows as EOF
    rows: list[dict[str, Any]] = []
    try:
        while (item := out_r.recv() if out_r.poll(180) else "no result within 180 s") is not None:
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


def label(size: int) -> str:
    return f"{size // 2**20} MiB" if size >= 2**20 else f"{size // 2**10} KiB"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| backend | block | GB/s | x memcpy | hand-off p50 ms | p90 ms | write() p50 ms | MiB moved |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["block_bytes"], r["backend"] != "memcpy")):
        lines.append(f"| {r['backend']} | {label(r['block_bytes'])} | {r['gbps']:.2f} | {r['ratio']:.2f} "
                     f"| {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['write_p50_ms']:.2f} | {r['bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]], args) -> str:
    parts = [f"{b} {min(rs):.2f}-{max(rs):.2f}x" for b in args.backend_list
             if (rs := [r["ratio"] for r in rows if r["backend"] == b])]
    big = max(args.size_list)
    lat = ", ".join(f"{r['backend']} {r['p50_ms']:.2f} ms (write() {r['write_p50_ms']:.2f})"
                    for r in rows if r["block_bytes"] == big)
    return (f"Over loopback the backends move {' and '.join(parts)} of memcpy bandwidth; a {args.blocks}-block "
            f"request of {label(big)} blocks hands off in (p50) {lat}, the gap to write() being the "
            f"receiver noticing the transfer.")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark; prints the table, optionally appends to --results; returns the rows."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [memcpy_row(size, args) for size in args.size_list]
    for backend in args.backend_list:
        rows += run_backend(backend, args)
    ref = {r["block_bytes"]: r["gbps"] for r in rows if r["backend"] == "memcpy"}
    for r in rows:
        r["ratio"] = r["gbps"] / ref[r["block_bytes"]]
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    result = {"command": f"{exe} -m bench.kv_transfer {shlex.join(argv)}".strip(), "machine": describe_machine(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "rows": rows}
    print(table(rows), summary(rows, args), sep="\n\n")
    if any(not r["verified"] or r["expected_bytes"] != r["bytes"] or r["expected_bytes"] != r["bytes_received"]
           for r in rows):
        print("WARNING: some rows moved unexpected bytes or failed verification", file=sys.stderr)
    if args.results:
        if not Path(args.results).exists():
            Path(args.results).write_text("# Benchmark results\n")
        tls = os.environ.get("UCX_TLS", "default")
        with Path(args.results).open("a") as f:
            f.write(f"\n## KV transfer bandwidth and hand-off latency ({result['date']})\n\n"
                    f"- Command: `{result['command']}`\n- Machine: {result['machine']}\n- Date: {result['date']}\n"
                    f"- Workload: block = K+V of one page of one layer (1 layer, 8 KV heads x 128, float16); "
                    f"{args.blocks} scattered blocks per write; bandwidth over >= 8 writes and >= {args.total_mib:g} "
                    f"MiB (fewer past ~{args.cap_s:g} s); hand-off = write() to SUCCESS at both ends, up to "
                    f"{args.samples} samples after {args.warmup} warm-ups; write() = sender SUCCESS only; sender "
                    f"and receiver in separate processes over loopback (UCX_TLS={tls}); memcpy = index_select into "
                    f"a reused buffer + index_copy_ in one process; {args.threads} torch thread(s)\n\n"
                    f"{table(rows)}\n\n{summary(rows, args)}\n")
    return result


if __name__ == "__main__":
    main()
