"""Mixed engine steps (prefill chunks next to decode tokens) by kernel kind: how near the matmul rate
the step's linear layers run, and how much of the step is attention, other kernels and gaps.

Issue 17's target: any mix of prefill chunks at >= 70% of the matmul rate in the step's linear
layers. For each mix (D decoding requests, prefill chunks c1..ck), the bench starts D requests and
steps until they all decode, then adds k prompts of lengths c1..ck (each a whole chunk, so every one
finishes its prompt in the step), checks that the next step holds exactly that mix
(`Engine.last_schedule`), and on CUDA profiles it (torch.profiler, synchronous steps). Kernels are
classed as GEMM (cuBLAS / CUTLASS names), attention (the Triton extend / decode kernels) or other;
the linear FLOPs are 2 x tokens x the decoder's linear weights, plus the LM head for the rows that
sample. Ratios are against the bf16 matmul ceiling measured in the same run (`gpu_engine.ceilings`).

    python3 -m baton.bench.mixed_step_profile --model /tmp/m8b [--reps 3] [--json $OUT/mixed_step.json]

On CPU (`--device cpu`, a tiny model) it only checks the mixes' composition: the unit test's path.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
from dataclasses import dataclass
from typing import Any, Optional

import torch

GEMM_MARKERS = ("gemm", "nvjet", "xmma", "cutlass", "gemv")
ATTENTION_MARKERS = ("_extend", "_decode_split", "_decode_reduce", "_decode_kernel")


@dataclass(frozen=True)
class Mix:
    """One step's composition: `decodes` one-token rows and prefill chunks of these lengths."""

    decodes: int
    chunks: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return self.decodes + sum(self.chunks)

    @property
    def label(self) -> str:
        chunks = f"{len(self.chunks)} x {self.chunks[0]}" if len(set(self.chunks)) == 1 else \
            " + ".join(map(str, self.chunks))
        return chunks + (f" + {self.decodes} decodes" if self.decodes else "")


MIXES = (Mix(0, (4096,)), Mix(0, (1024,) * 4), Mix(0, (256,) * 16), Mix(32, (512,)), Mix(64, (2048, 2048)),
         Mix(256, (512,) * 8), Mix(128, (1024, 512, 256, 128)))


def linear_flops(cfg, tokens: int, sampled_rows: int) -> float:
    """Matmul FLOPs of one step's linear layers: every token through the decoder's projections, the
    sampled rows through the LM head."""
    per_token = 2 * cfg.num_layers * cfg.hidden_size * (
        (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim
        + 3 * cfg.intermediate_size)
    return per_token * tokens + 2 * cfg.hidden_size * cfg.vocab_size * sampled_rows


def _greedy(n: int):
    from baton.services.engine.sampling_params import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def start_decodes(engine, count: int, vocab: int, rng: random.Random) -> list[str]:
    """`count` requests with short prompts, stepped until every one is past its prefill."""
    ids = [f"d{i}" for i in range(count)]
    for rid in ids:
        engine.add_request(rid, [rng.randrange(3, vocab) for _ in range(16)], _greedy(100_000))
    if not ids:
        return ids
    for _ in range(200):
        engine.step()
        decoding = {rid for rid, _, n in engine.last_schedule if n == 1}
        if decoding.issuperset(ids):
            return ids
    raise RuntimeError(f"{count} decodes did not all start within 200 steps")


def mixed_step(engine, mix: Mix, vocab: int, rng: random.Random, tag: str, profile: bool) -> dict[str, Any]:
    """Add the mix's prompts, run the step that holds them beside the decodes, return its
    composition (and, with `profile`, its kernels); the prompts are aborted afterwards."""
    ids = [f"{tag}-p{i}" for i in range(len(mix.chunks))]
    for rid, length in zip(ids, mix.chunks):
        engine.add_request(rid, [rng.randrange(3, vocab) for _ in range(length)], _greedy(2))
    kernels = None
    if profile:
        from torch.profiler import ProfilerActivity
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    else:
        engine.step()
    schedule = list(engine.last_schedule)
    for rid in ids:
        engine.abort(rid)
    prefills = sorted(n for rid, _, n in schedule if rid.startswith(f"{tag}-p"))
    decodes = sum(1 for rid, _, n in schedule if rid[:1] == "d" and rid[1:].isdigit() and n == 1)
    out: dict[str, Any] = {"prefill_chunks": prefills, "decodes": decodes,
                           "matches": prefills == sorted(mix.chunks) and decodes == mix.decodes}
    if kernels:
        out.update(classify(kernels))
    return out


def classify(kernels) -> dict[str, float]:
    """GPU time (ms) by kernel kind, the span from the first kernel's start to the last one's end, and
    the gaps (span minus busy time)."""
    kinds = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for e in kernels:
        name = e.name.lower()
        kind = "gemm" if any(m in name for m in GEMM_MARKERS) else \
            "attention" if any(m in name for m in ATTENTION_MARKERS) else "other"
        kinds[kind] += e.time_range.elapsed_us() / 1e3
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e3
    busy = sum(kinds.values())
    return {"gemm_ms": kinds["gemm"], "attention_ms": kinds["attention"], "other_ms": kinds["other"],
            "span_ms": span, "gaps_ms": max(0.0, span - busy), "kernels": len(kernels)}


def run(engine, mixes=MIXES, reps: int = 3, profile: bool = True, flops_ceiling: Optional[float] = None,
        seed: int = 0) -> list[dict[str, Any]]:
    """Every mix `reps` times (after one unprofiled warm-up each); the median of each figure."""
    cfg = engine.model_config
    vocab = min(128000, cfg.vocab_size)
    rng = random.Random(seed)
    engine.overlap_schedule = False  # one step's kernels in one profile
    rows = []
    for n, mix in enumerate(mixes):
        decodes = start_decodes(engine, mix.decodes, vocab, rng)
        mixed_step(engine, mix, vocab, rng, f"m{n}w", profile=False)  # warm-up: first-use allocations
        runs = [mixed_step(engine, mix, vocab, rng, f"m{n}r{r}", profile) for r in range(reps)]
        for rid in decodes:
            engine.abort(rid)
        row: dict[str, Any] = {"mix": mix.label, "tokens": mix.tokens, "decodes": mix.decodes,
                               "chunks": list(mix.chunks), "matches": all(r["matches"] for r in runs),
                               "seen": runs[-1]["prefill_chunks"], "seen_decodes": runs[-1]["decodes"]}
        if profile:
            for key in ("gemm_ms", "attention_ms", "other_ms", "span_ms", "gaps_ms"):
                row[key] = statistics.median(r[key] for r in runs)
            flops = linear_flops(cfg, mix.tokens, mix.decodes + len(mix.chunks))
            row["linear_tflop_s"] = flops / (row["gemm_ms"] / 1e3) / 1e12
            if flops_ceiling:
                row["gemm_ratio"] = flops / (row["gemm_ms"] / 1e3) / flops_ceiling
                row["step_ratio"] = flops / (row["span_ms"] / 1e3) / flops_ceiling
        rows.append(row)
        print("mixed", json.dumps(row), flush=True)
    return rows


def table(rows: list[dict[str, Any]], ceiling: Optional[float]) -> str:
    head = (f"bf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s (same run)\n" if ceiling else "") + \
        "| mix | tokens | GEMM ms | linear TFLOP/s | x ceiling (GEMMs) | step span ms | x ceiling (whole step) | " \
        "attention ms | other ms | gaps ms | mix as asked |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    lines = [head]
    for r in rows:
        lines.append(f"| {r['mix']} | {r['tokens']} | {r['gemm_ms']:.2f} | {r['linear_tflop_s']:.0f} | "
                     f"{r.get('gemm_ratio', float('nan')):.1%} | {r['span_ms']:.2f} | "
                     f"{r.get('step_ratio', float('nan')):.1%} | {r['attention_ms']:.2f} | {r['other_ms']:.2f} | "
                     f"{r['gaps_ms']:.2f} | {'yes' if r['matches'] else 'no: ' + str(r['seen'])} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="python -m baton.bench.mixed_step_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/tmp/m8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--engine", default="", help="extra EngineConfig options as JSON")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "mixed_step.json"))
    args = p.parse_args(argv)
    from baton.services.engine import LLM
    options = dict(device=args.device, skip_tokenizer_init=True, chunked_prefill_size=8192,
                   max_num_batched_tokens=8192)
    options.update(json.loads(args.engine or "{}"))
    ceiling = None
    if args.device == "cuda":
        from baton.bench.gpu_engine import ceilings
        ceiling = ceilings()["bf16_flops"]
    llm = LLM(model=args.model, **options)
    rows = run(llm.engine, reps=args.reps, profile=args.device == "cuda", flops_ceiling=ceiling)
    with open(args.json, "w") as out:
        json.dump({"ceiling_bf16_flops": ceiling, "options": options, "rows": rows}, out, indent=1)
    if args.device == "cuda":
        print(table(rows, ceiling), flush=True)
    return rows


if __name__ == "__main__":
    main()
