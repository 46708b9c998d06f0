"""The extend (prefill) attention kernel against another version of it, on CUDA: time, TFLOP/s and the largest
difference per case and block config.

    cp services/engine/attention/triton_kernels.py .devtree/old_triton_kernels.py   # before a kernel change
    python3 bench/extend_kernel_ab.py --old .devtree/old_triton_kernels.py [--configs 128,64,4,3 64,64,4,2]

Cases: the last 4,096-token chunk of a 32k prompt, an 8,192-token first chunk, and eight sequences of a 1k prefix plus
1k new tokens (32 query / 8 KV heads x 128, bf16, page 16). The TFLOP/s count the causal half only.
"""
from __future__ import annotations

import argparse
import importlib.util

import torch

HQ, HKV, D, PAGE = 32, 8, 128, 16
CASES = (("32k last chunk", [28672], [4096]), ("8k first chunk", [0], [8192]), ("8 x (1k prefix + 1k)", [1024] * 8, [1024] * 8))


def load_old(path: str):
    spec = importlib.util.spec_from_file_location("old_triton_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def case_inputs(prefixes: list[int], news: list[int]):
    """Paged K/V at random pages, queries and the kernel's per-sequence arrays for one case."""
    total = sum(p + n for p, n in zip(prefixes, news))
    blocks = total // PAGE + len(prefixes) + 1
    k = torch.randn(blocks * PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    perm = torch.randperm(blocks, device="cuda").int()
    width = max((p + n + PAGE - 1) // PAGE for p, n in zip(prefixes, news))
    table = torch.zeros(len(prefixes), width, dtype=torch.int32, device="cuda")
    at = 0
    for i, (p, n) in enumerate(zip(prefixes, news)):
        m = (p + n + PAGE - 1) // PAGE
        table[i, :m] = perm[at:at + m]
        at += m
    q = torch.randn(sum(news), HQ, D, device="cuda", dtype=torch.bfloat16)
    starts = torch.tensor([sum(news[:i]) for i in range(len(news))], dtype=torch.int32, device="cuda")
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device="cuda")  # noqa: E731
    return q, k, v, table, starts, as_int(news), as_int(prefixes)


def timed_ms(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="a copy of triton_kernels.py to compare against")
    p.add_argument("--configs", nargs="*", default=[], help="BLOCK_M,BLOCK_N,warps,stages tuples to time beside the default")
    args = p.parse_args(argv)
    from baton.services.engine.attention import triton_kernels as new
    old = load_old(args.old)
    torch.manual_seed(0)
    print("| case | kernel | ms | TFLOP/s | max abs diff vs old |\n|---|---|---:|---:|---:|")
    for name, prefixes, news in CASES:
        inputs = case_inputs(prefixes, news)
        flops = sum(4 * n * (p + n / 2) * D * HQ for p, n in zip(prefixes, news))
        call = (*inputs, PAGE, D ** -0.5)
        ref = old.extend_attention(*call, max_query_len=max(news))
        runs = [("old", lambda: old.extend_attention(*call, max_query_len=max(news))),
                ("new default", lambda: new.extend_attention(*call, max_query_len=max(news)))]
        for text in args.configs:
            cfg = tuple(int(x) for x in text.split(","))
            runs.append((f"new {cfg}", lambda cfg=cfg: new.extend_attention(*call, max_query_len=max(news), config=cfg)))
        for label, fn in runs:
            try:
                diff = (fn().float() - ref.float()).abs().max().item()
                ms = timed_ms(fn)
                print(f"| {name} | {label} | {ms:.3f} | {flops / ms / 1e9:.0f} | {diff:.2e} |", flush=True)
            except Exception as exc:  # noqa: BLE001 - one config failing to compile is a row, not the end
                print(f"| {name} | {label} | failed: {type(exc).__name__}: {str(exc)[:120]} | | |", flush=True)


if __name__ == "__main__":
    main()
