"""Where a lone request's first token goes inside the engine: steps, step times, readback.

For fresh random prompts of each length (no prefix hit), one at a time on an idle engine:
`add_request`, then `step()` until the request's first output token appears, timing every
step on the host (perf_counter) and, separately, a bare model forward of the same prompt
synchronised to the GPU. With overlap scheduling on, the first token comes out of the
second step (the step that launches the next token reads the first one back), so the
first-token time is prefill + one decode launch + host work; with it off, of the first.
Compares both in the same process. The difference to bench/ttft_probe.py's decode-worker
figure is what the worker shell (gRPC, asyncio, engine thread) adds.

    python3 -m baton.bench.first_token_profile --model /tmp/m8b --prompt-tokens 128,1024
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any, Optional, Sequence

import torch


def _greedy(n: int):
    from baton.services.engine.sampling_params import SamplingParams
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def first_token(engine, prompt: list[int], rid: str) -> dict[str, Any]:
    """Steps and host time from add_request to the first output token of `rid`."""
    start = time.perf_counter()
    engine.add_request(rid, prompt, _greedy(2))
    steps, step_ms = 0, []
    while True:
        t0 = time.perf_counter()
        deltas = engine.step()
        step_ms.append(1000.0 * (time.perf_counter() - t0))
        steps += 1
        if any(d.parent_id == rid and d.new_token_ids for d in deltas):
            break
        if steps > 50:
            raise RuntimeError("no first token after 50 steps")
    ttft = 1000.0 * (time.perf_counter() - start)
    while engine.has_unfinished():
        engine.step()
    return {"ttft_ms": ttft, "steps": steps, "step_ms": step_ms}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward_ms(engine, prompt: list[int], rid: str) -> float:
    """A whole one-token request timed to the GPU (prefill forward + sample + readback) with
    the overlap scheduler's extra step excluded: the engine's own minimum."""
    _sync()
    start = time.perf_counter()
    engine.add_request(rid, prompt, _greedy(1))
    while engine.has_unfinished():
        engine.step()
    _sync()
    return 1000.0 * (time.perf_counter() - start)


def trace_first_step(engine, prompt: list[int], top: int = 15) -> list[tuple[str, float, int]]:
    """The host operations of a fresh request's first step by self CPU time (torch.profiler):
    (name, self CPU ms, calls)."""
    from torch.profiler import ProfilerActivity, profile

    engine.add_request("trace", prompt, _greedy(2))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    while engine.has_unfinished():
        engine.step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [(e.key[:80], round(e.self_cpu_time_total / 1000.0, 3), e.count) for e in events]


def run(model: str, lengths: list[int], requests: int, overlap: bool, device: str = "cuda",
        vocab: int = 128000, trace: bool = False, piecewise: bool = True) -> list[dict[str, Any]]:
    from baton.services.engine import LLM
    llm = LLM(model=model, device=device, skip_tokenizer_init=True, disable_overlap_schedule=not overlap,
              mem_fraction_static=0.4, **({} if piecewise else {"piecewise_cuda_graph_max_tokens": 0}))
    engine = llm.engine
    rng = random.Random(0)
    rows = []
    for n in lengths:
        for i in range(3):  # warm this length
            first_token(engine, [rng.randrange(100, vocab) for _ in range(n)], f"w{n}-{i}")
        samples = [first_token(engine, [rng.randrange(100, vocab) for _ in range(n)], f"r{n}-{i}")
                   for i in range(requests)]
        whole = [forward_ms(engine, [rng.randrange(100, vocab) for _ in range(n)], f"f{n}-{i}")
                 for i in range(requests)]
        rows.append({"overlap": overlap, "piecewise": piecewise, "prompt_tokens": n,
                     "ttft_p50_ms": statistics.median(s["ttft_ms"] for s in samples),
                     "steps_to_first_token": statistics.median(s["steps"] for s in samples),
                     "first_step_p50_ms": statistics.median(s["step_ms"][0] for s in samples),
                     "last_step_p50_ms": statistics.median(s["step_ms"][-1] for s in samples),
                     "one_token_request_p50_ms": statistics.median(whole)})
    if trace:
        rows[-1]["trace"] = trace_first_step(engine, [rng.randrange(100, vocab) for _ in range(lengths[0])])
    del llm, engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="python3 -m baton.bench.first_token_profile", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/tmp/m8b")
    p.add_argument("--prompt-tokens", default="128,1024")
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--vocab", type=int, default=128000, help="token ids are drawn from [100, vocab)")
    p.add_argument("--piecewise-modes", action="store_true", help="also run with piecewise CUDA graphs off")
    p.add_argument("--trace", action="store_true", help="also profile the host work of one first step per mode")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    lengths = [int(n) for n in args.prompt_tokens.split(",")]
    modes = [(True, True), (True, False), (False, True)] if args.piecewise_modes else [(True, True), (False, True)]
    rows = [r for overlap, piecewise in modes
            for r in run(args.model, lengths, args.requests, overlap, args.device, args.vocab, args.trace, piecewise)]
    print("| overlap | piecewise graphs | prompt tokens | TTFT p50 ms | steps to 1st token | 1st step ms | last step ms | 1-token request ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {'on' if r['overlap'] else 'off'} | {'on' if r['piecewise'] else 'off'} | {r['prompt_tokens']} | {r['ttft_p50_ms']:.2f} | "
              f"{r['steps_to_first_token']:.0f} | {r['first_step_p50_ms']:.2f} | {r['last_step_p50_ms']:.2f} | "
              f"{r['one_token_request_p50_ms']:.2f} |")
    for r in rows:
        if "trace" in r:
            print(f"host work of a fresh {lengths[0]}-token request's first step, overlap {'on' if r['overlap'] else 'off'}, "
                  f"piecewise graphs {'on' if r['piecewise'] else 'off'}:")
            for name, ms, calls in r["trace"]:
                print(f"  {ms:8.3f} ms  x{calls:<5d} {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
