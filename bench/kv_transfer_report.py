"""How `bench.kv_transfer` reports: the markdown table, the one-line summary, the RESULTS.md section.

Rows are the dicts `kv_transfer.row` builds, each with its `ratio` to the same-run reference
of its block size: "memcpy" on --device cpu (one process, host memory), "d2d" on --device
cuda (one process, a device-to-device copy on the GPU). Knows nothing of how rows were measured.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REFERENCE = {"cpu": "memcpy", "cuda": "d2d"}
"""The same-run reference row's backend name, per --device."""


def label(size: int) -> str:
    return f"{size // 2**20} MiB" if size >= 2**20 else f"{size // 2**10} KiB"


def table(rows: list[dict[str, Any]], device: str = "cpu") -> str:
    ref = REFERENCE[device]
    lines = [f"| backend | block | GB/s | x {ref} | hand-off p50 ms | p90 ms | write() p50 ms | MiB moved |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["block_bytes"], r["backend"] != ref)):
        lines.append(f"| {r['backend']} | {label(r['block_bytes'])} | {r['gbps']:.2f} | {r['ratio']:.2f} "
                     f"| {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['write_p50_ms']:.2f} | {r['bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]], args) -> str:
    parts = [f"{b} {min(rs):.2f}-{max(rs):.2f}x" for b in args.backend_list
             if (rs := [r["ratio"] for r in rows if r["backend"] == b])]
    big = max(args.size_list)
    lat = ", ".join(f"{r['backend']} {r['p50_ms']:.2f} ms (write() {r['write_p50_ms']:.2f})"
                    for r in rows if r["block_bytes"] == big)
    moved = " and ".join(parts) or "nothing (no backend ran)"
    if args.device == "cuda":
        where = (f"Between two processes on one GPU (both KV caches in VRAM) the backends move {moved} of the "
                 f"bandwidth of a device-to-device copy of the same blocks in one process")
    else:
        where = f"Over loopback the backends move {moved} of memcpy bandwidth"
    return (f"{where}; a {args.blocks}-block request of {label(big)} blocks hands off in (p50) {lat}, the gap to "
            f"write() being the receiver noticing the transfer.")


def workload(args) -> str:
    """The "- Workload:" line of a RESULTS.md section."""
    tls = os.environ.get("UCX_TLS", "default")
    common = (f"block = K+V of one page of one layer (1 layer, 8 KV heads x 128, float16); {args.blocks} scattered "
              f"blocks per write; bandwidth over >= 8 writes and >= {args.total_mib:g} MiB (fewer past "
              f"~{args.cap_s:g} s); hand-off = write() to SUCCESS at both ends, up to {args.samples} samples after "
              f"{args.warmup} warm-ups; write() = sender SUCCESS only; ")
    if args.device == "cuda":
        nets = os.environ.get("UCX_NET_DEVICES", "all")
        where = (f"sender and receiver in separate processes, both KV caches in VRAM of GPU 0; nixl writes VRAM to "
                 f"VRAM (UCX_TLS={tls}, UCX_NET_DEVICES={nets}, which restricts network devices only: cuda_ipc is "
                 f"an intra-node transport), tcp stages the blocks through host memory over loopback; d2d = "
                 f"index_select into a reused device buffer + index_copy_ in one process (indices on the GPU), "
                 f"each move timed to torch.cuda.synchronize()")
    else:
        where = (f"sender and receiver in separate processes over loopback (UCX_TLS={tls}); memcpy = index_select "
                 f"into a reused buffer + index_copy_ in one process")
    return common + where + f"; {args.threads} torch thread(s)"


def append_section(path: str, result: dict[str, Any], args) -> None:
    """Append this run's section (command, machine, workload, table, summary) to the markdown file `path`."""
    file = Path(path)
    if not file.exists():
        file.write_text("# Benchmark results\n")
    title = "KV transfer bandwidth and hand-off latency" + (", GPU VRAM" if args.device == "cuda" else "")
    skipped = "".join(f"- Skipped: {why}\n" for why in result.get("skipped", []))
    with file.open("a") as f:
        f.write(f"\n## {title} ({result['date']})\n\n"
                f"- Command: `{result['command']}`\n- Machine: {result['machine']}\n- Date: {result['date']}\n"
                f"- Workload: {workload(args)}\n{skipped}\n"
                f"{table(result['rows'], args.device)}\n\n{summary(result['rows'], args)}\n")
