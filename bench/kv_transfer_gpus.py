"""KV hand-off of one 8B-shaped request between two GPUs, per backend, vs `copy_` of the same bytes (issue 16).

The `--two-gpus` mode of bench/kv_transfer.py. A request's KV is Llama-3.1-8B-shaped: 32 layers,
8 KV heads x 128, bfloat16, pages of 16 tokens (128 KiB of K+V per token: 256 MiB for 2k tokens,
1 GiB for 8k). The sender process owns GPU 0, the receiver GPU 1 (both see every GPU); each holds
a pool of twice the request's blocks, and a write moves every page of the request as scattered
(src, dst) pairs (even source blocks into odd destination blocks, reversed), as a real hand-off does.
- hand-off: write() to the later of SUCCESS at the sender and at the receiver, p50 / p90 over
  `--samples` writes after `--warmup`; GB/s = request bytes / p50 (1e9 bytes/s);
- reference, same run: `dst.copy_(src)` of one contiguous buffer of the same bytes from GPU 0 to
  GPU 1 ("copy_"), and the same with the gather / scatter a hand-off needs ("gather+copy_+scatter":
  index_select on GPU 0, copy_ to GPU 1, index_copy_ there), each timed to both GPUs' synchronize;
- ratio = backend GB/s / copy_ GB/s (the issue's target: at least 0.8); `--chunk-mib` sets the nccl
  backend's message size (64 MiB: 16 messages for an 8k request), to sweep it.
Every destination block is checked afterwards against its source block's pattern.

    python3 -m baton.bench.kv_transfer --two-gpus --backends nccl --tokens 2048,8192 --json $OUT/kv_nccl.json
"""
from __future__ import annotations

import os
import statistics
import time
import traceback
from typing import Any

import numpy as np
import torch

SHAPE = dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, page_size=16)
"""Llama-3.1-8B's KV cache per layer."""
TOKEN_BYTES = 2 * 32 * 8 * 128 * 2


def dry_run() -> bool:
    """BATON_BENCH_DRY_RUN=1: both "GPUs" are the CPU (a smoke run of this file's code on a machine
    without two GPUs; nccl runs over gloo)."""
    return os.environ.get("BATON_BENCH_DRY_RUN") == "1"


def gpu(index: int) -> torch.device:
    """GPU `index`, made this process's current device (the CPU in a dry run)."""
    if dry_run():
        return torch.device("cpu")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def sync(*devices: torch.device) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def layout(tokens: int):
    from baton.services.engine.kv.kv_cache import KVLayout

    return KVLayout(num_blocks=2 * (tokens // SHAPE["page_size"]), **SHAPE)


def pairs(tokens: int) -> list[tuple[int, int]]:
    n = tokens // SHAPE["page_size"]
    return [(2 * i, 2 * (n - 1 - i) + 1) for i in range(n)]


def pattern_cache(tokens: int, device: torch.device, fill: bool):
    from baton.services.engine.kv.kv_cache import KVCache

    cache = KVCache(layout(tokens), device)
    if fill:  # block b of tensor t holds +-((7b + t) % 200 + 1): exact in bfloat16, any misplaced block shows
        n = cache.layout.num_blocks
        ids = torch.arange(n, device=device)[:, None]
        for t, tensor in enumerate((*cache.keys, *cache.values)):
            sign = 1 if t < len(cache.keys) else -1
            tensor.view(n, -1).copy_(sign * ((7 * ids + t) % 200 + 1))
    return cache


def verify(cache, tokens: int) -> bool:
    """Every destination block holds its source block's pattern (one comparison per tensor)."""
    n, device = cache.layout.num_blocks, cache.keys[0].device
    src = torch.tensor([s for s, _ in pairs(tokens)], device=device)[:, None]
    dst = torch.tensor([d for _, d in pairs(tokens)], device=device)
    for t, tensor in enumerate((*cache.keys, *cache.values)):
        sign = 1 if t < len(cache.keys) else -1
        if not bool((tensor.view(n, -1)[dst] == sign * ((7 * src + t) % 200 + 1)).all()):
            return False
    return True


def options(backend: str, args) -> dict[str, Any]:
    """Engine options: the nccl backend's chunk size (`--chunk-mib`)."""
    return {"chunk_bytes": int(args.chunk_mib * 2**20)} if backend == "nccl" else {}


def _receiver(backend: str, args, peer) -> None:
    device = gpu(1)
    from baton.services.transfer import TransferState, create_transfer_engine
    from baton.services.worker.kv_memory import register_kv_cache
    for tokens in args.token_list:
        cache = pattern_cache(tokens, device, fill=False)
        engine = create_transfer_engine(backend, "bench-decode", register_kv_cache(cache), **options(backend, args))
        peer.send(engine.descriptor().to_bytes())
        while (tid := peer.recv()) is not None:
            state = engine.wait_received(tid, timeout=120.0)
            peer.send(time.monotonic() if state is TransferState.SUCCESS else None)
            engine.forget(tid)
        peer.send(verify(cache, tokens))
        engine.close()


def _sender(backend: str, args, peer, out) -> None:
    try:
        device = gpu(0)
        from baton.services.transfer import PeerDescriptor, create_transfer_engine
        from baton.services.worker.kv_memory import register_kv_cache
        for tokens in args.token_list:
            cache = pattern_cache(tokens, device, fill=True)
            engine = create_transfer_engine(backend, "bench-prefill", register_kv_cache(cache), **options(backend, args))
            desc = PeerDescriptor.from_bytes(peer.recv())
            start = time.monotonic()
            engine.connect(desc, timeout=120.0)
            connect_s = time.monotonic() - start
            times, write_times = [], []
            for i in range(args.warmup + args.samples):
                start = time.monotonic()
                peer.send(f"w-{i}")
                handle = engine.write(desc.worker_id, f"w-{i}", pairs(tokens), timeout=120.0)
                done, seen = time.monotonic(), peer.recv()
                if not handle.ok or seen is None:
                    raise RuntimeError(f"{backend} write w-{i}: {handle.error or 'not received'}")
                if i >= args.warmup:
                    times.append(max(done, seen) - start)
                    write_times.append(done - start)
            peer.send(None)
            out.send(_row(backend, tokens, handle.bytes, times, write_times, peer.recv(), connect_s))
            engine.close()
        out.send(None)
    except BaseException:
        out.send(traceback.format_exc())


def _row(backend: str, tokens: int, nbytes: int, times: list[float], write_times: list[float], verified: bool,
         connect_s: float = 0.0) -> dict[str, Any]:
    p50 = statistics.median(times)
    return {"backend": backend, "tokens": tokens, "bytes": nbytes, "samples": len(times), "p50_ms": 1e3 * p50,
            "p90_ms": 1e3 * float(np.percentile(times, 90)), "write_p50_ms": 1e3 * statistics.median(
                write_times), "gbps": nbytes / p50 / 1e9, "verified": verified, "connect_s": connect_s}


def run_backend(backend: str, args) -> list[dict[str, Any]]:
    from baton.bench.kv_transfer import run_backend as spawn_pair
    return spawn_pair(backend, args, receiver=_receiver, sender=_sender, timeout_s=600)


def reference_rows(tokens: int, args) -> list[dict[str, Any]]:
    """copy_ GPU 0 -> GPU 1 of the request's bytes: contiguous, and with the hand-off's gather / scatter."""
    b, a = gpu(1), gpu(0)
    src, dst = pattern_cache(tokens, a, fill=True), pattern_cache(tokens, b, fill=False)
    n, moved = src.layout.num_blocks, len(pairs(tokens))
    nbytes = moved * TOKEN_BYTES * SHAPE["page_size"]
    flat_a = torch.empty(nbytes, dtype=torch.uint8, device=a)
    flat_b = torch.empty(nbytes, dtype=torch.uint8, device=b)
    si = torch.tensor([s for s, _ in pairs(tokens)], device=a)
    di = torch.tensor([d for _, d in pairs(tokens)], device=b)
    tensors = list(zip((*src.keys, *src.values), (*dst.keys, *dst.values)))
    per = nbytes // len(tensors)

    def contiguous() -> None:
        flat_b.copy_(flat_a)

    def scattered() -> None:
        for i, (s, d) in enumerate(tensors):
            torch.index_select(s.view(n, -1).view(torch.uint8), 0, si, out=flat_a[i * per:(i + 1) * per].view(moved, -1))
        flat_b.copy_(flat_a)
        for i, (s, d) in enumerate(tensors):
            d.view(n, -1).view(torch.uint8).index_copy_(0, di, flat_b[i * per:(i + 1) * per].view(moved, -1))

    rows = []
    for name, move in (("copy_", contiguous), ("gather+copy_+scatter", scattered)):
        times = []
        for i in range(args.warmup + args.samples):
            sync(a, b)
            start = time.monotonic()
            move()
            sync(a, b)
            if i >= args.warmup:
                times.append(time.monotonic() - start)
        rows.append(_row(name, tokens, nbytes, times, times, verify(dst, tokens) if move is scattered else True))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    ref = {r["tokens"]: r["gbps"] for r in rows if r["backend"] == "copy_"}
    lines = ["| path | tokens | MiB | p50 ms | p90 ms | write() p50 ms | GB/s | vs copy_ | verified |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r["ratio"] = r["gbps"] / ref[r["tokens"]]
        lines.append(f"| {r['backend']} | {r['tokens']} | {r['bytes'] / 2**20:.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p90_ms']:.2f} | {r['write_p50_ms']:.2f} | {r['gbps']:.1f} | {r['ratio']:.2f} | "
                     f"{r['verified']} |")
    return "\n".join(lines)


def run(args) -> list[dict[str, Any]]:
    """Every row (references first); the caller prints and records them."""
    if torch.cuda.device_count() < 2 and not dry_run():
        raise SystemExit("--two-gpus needs two visible CUDA GPUs")
    rows = [r for tokens in args.token_list for r in reference_rows(tokens, args)]
    for backend in args.backend_list:
        rows += run_backend(backend, args)
    print(table(rows))
    return rows
