"""The fp8 KV cache (`--kv-cache-dtype fp8_e4m3`) against the auto (bf16) cache, in one GPU run.

On the random-weight Llama-3.1-8B-shaped model of `bench.gpu_engine` (`--make-model`), the
two engines run one after the other with the same options, each in a child process of its own
(so each gets the whole GPU share; the auto run hands its reference sequences and logits to the
fp8 run through a file), and for each it reports:
- kv_tokens: the KV pool the default memory share sizes (fp8: twice, at one byte an element);
- accuracy, against the auto cache: ACC_SEQS prompts of ACC_PROMPT tokens, greedy ACC_NEW
  tokens from the auto engine; then both engines compute teacher-forced logits along those
  sequences (the prompt as one prefill, then one decode step per token: the extend and decode
  kernels both read fp8); reported: top-1 agreement, mean / max |logit error| (and the logits'
  std for scale), and the fp8 engine's own greedy first divergence from the auto engine's;
- throughput: the decode-heavy ShareGPT-like workload of `bench.gpu_engine` (1,000 prompts,
  `w1`) and a long-context decode workload (`long`: LONG_PROMPTS prompts of LONG_IN tokens,
  LONG_OUT out, where the KV reads are a large share of a step), out tokens/s, greedy, EOS
  ignored, after a warm-up; fp8 / auto ratios.

    python3 -m baton.bench.gpu_engine --make-model /tmp/m8b
    python3 -m baton.bench.kv_fp8 --model /tmp/m8b            # writes $OUT/kv_fp8.json, prints a table

`teacher_forced_logits` is also what the fp8 tests use (CPU and GPU).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ACC_SEQS, ACC_PROMPT, ACC_NEW = 8, 512, 128
LONG_PROMPTS, LONG_IN, LONG_OUT = 128, 2048, 256
QUICK = dict(acc=(2, 24, 8), long=(2, 40, 8), w1=6)
"""`--quick` sizes (a CPU smoke run on a tiny model, `--engine '{"device": "cpu"}'`)."""


def teacher_forced_logits(engine, seqs: list[list[int]], prompt_len: int) -> torch.Tensor:
    """float32 logits [len(seqs), L - prompt_len + 1, vocab] on the CPU (L = the sequences' common
    length): row j predicts token prompt_len + j from tokens 0..prompt_len + j - 1. The prompts
    go in as one prefill step, then one decode step per position for all sequences together,
    on blocks taken from the engine's free pool (the engine must be idle) and given back."""
    length = len(seqs[0])
    assert all(len(s) == length for s in seqs) and 1 <= prompt_len <= length
    from baton.services.engine.request import Request
    from baton.services.engine.sampling_params import SamplingParams
    from baton.services.engine.scheduling.scheduler import ScheduledItem
    page = engine.config.page_size
    blocks = [engine.pool.allocate(-(-length // page)) for _ in seqs]

    def item(i: int, start: int, n: int) -> ScheduledItem:
        request = Request(request_id=f"tf-{i}", parent_id=f"tf-{i}", index=0,
                          prompt_token_ids=list(seqs[i][:start + n]), params=SamplingParams(max_tokens=1),
                          arrival=0, block_table=blocks[i])
        return ScheduledItem(request, start, n)

    rows = []
    try:
        rows.append(engine.runner.execute([item(i, 0, prompt_len) for i in range(len(seqs))]).float().cpu())
        for pos in range(prompt_len, length):
            rows.append(engine.runner.execute([item(i, pos, 1) for i in range(len(seqs))]).float().cpu())
    finally:
        for b in blocks:
            engine.pool.release(b)
    return torch.stack(rows, 1)


def compare(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and |logit error| of `logits` against `reference` (same shape)."""
    err = (logits - reference).abs()
    return {"top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "mean_abs_logit_error": err.mean().item(), "max_abs_logit_error": err.max().item(),
            "reference_logit_std": reference.std().item()}


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the common length when none differs)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def long_workload(vocab: int, prompts: int, length: int) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(prompts)]


def run_engine(model: str, kind: str, options: dict, reference: dict | None,
               quick: bool = False) -> tuple[dict, dict]:
    """One engine's figures (in this process); returns (result row, what the next engine compares
    against: the sequences, the greedy outputs and the teacher-forced logits)."""
    from baton.bench.gpu_engine import greedy, timed_generate, workloads
    from baton.services.engine import LLM
    (n_acc, acc_prompt, acc_new), (n_long, long_in, long_out) = (
        (QUICK["acc"], QUICK["long"]) if quick else ((ACC_SEQS, ACC_PROMPT, ACC_NEW), (LONG_PROMPTS, LONG_IN, LONG_OUT)))
    began = time.time()
    llm = LLM(model=model, **{"device": "cuda", "skip_tokenizer_init": True, **options, "kv_cache_dtype": kind})
    engine = llm.engine
    layout = engine.kv_cache.layout
    row: dict[str, Any] = {"load_s": time.time() - began, "kv_tokens": layout.num_blocks * layout.page_size,
                           "kv_bytes_per_token": layout.bytes_per_token, "dtype": str(layout.dtype)}
    if layout.scales:
        row.update(scales_source=engine.kv_cache.scales_source, scale_min=min(layout.scales),
                   scale_max=max(layout.scales))
    vocab = engine.model_config.vocab_size
    rng = random.Random(3)
    prompts = [[rng.randrange(3, vocab) for _ in range(acc_prompt)] for _ in range(n_acc)]
    greedy_out = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(acc_new))]
    engine.flush()
    if reference is None:
        seqs = [p + g for p, g in zip(prompts, greedy_out)]
        reference = {"seqs": seqs, "greedy": greedy_out}
    logits = teacher_forced_logits(engine, reference["seqs"], acc_prompt)
    if "logits" in reference:
        row["accuracy"] = compare(reference["logits"], logits)
        firsts = [first_divergence(a, b) for a, b in zip(reference["greedy"], greedy_out)]
        row["accuracy"].update(greedy_first_divergence=sorted(firsts), greedy_equal_seqs=firsts.count(acc_new),
                               greedy_seqs=n_acc, greedy_prompt_tokens=acc_prompt, greedy_new_tokens=acc_new)
    else:
        reference["logits"] = logits
    w1, _ = workloads()
    w1 = ([[t % vocab for t in p] for p in w1[0][:QUICK["w1"]]], w1[1][:QUICK["w1"]]) if quick else w1
    timed_generate(llm, [p[:256] for p in w1[0][:64]], greedy(16))  # warm-up
    for name, (batch, outs) in (("w1", w1), ("long", (long_workload(vocab, n_long, long_in), [long_out] * n_long))):
        seconds, tokens = timed_generate(llm, batch, [greedy(o) for o in outs])
        row[name] = {"s": seconds, "out_tokens": tokens, "out_tok_s": tokens / seconds}
        print(kind, name, json.dumps(row[name]), flush=True)
    del llm, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row, reference


def run_child(args) -> None:
    """`--kind`: one engine's run; reads the reference from --ref when it exists, writes it there
    when it did not, and the row as JSON to --row."""
    ref_path = Path(args.ref)
    reference = torch.load(ref_path) if ref_path.exists() else None
    row, reference = run_engine(args.model, args.kind, json.loads(args.engine or "{}"), reference, args.quick)
    if not ref_path.exists():
        torch.save(reference, ref_path)
    Path(args.row).write_text(json.dumps(row))


def run_in_child(args, kind: str, ref: Path, work: Path) -> dict:
    row = work / f"{kind}.json"
    module = __spec__.name if __spec__ else "baton.bench.kv_fp8"
    cmd = [sys.executable, "-m", module, "--model", args.model, "--engine", args.engine, "--kind", kind,
           "--ref", str(ref), "--row", str(row)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, timeout=args.timeout)
    if proc.returncode != 0 or not row.exists():
        return {"error": f"the {kind} run exited {proc.returncode}"}
    return json.loads(row.read_text())


def table(res: dict) -> str:
    auto, fp8 = res.get("auto", {}), res.get("fp8_e4m3", {})
    lines = [f"GPU {res.get('gpu')}; {res.get('date')}; options {res.get('options')}",
             "| | auto (bf16) | fp8_e4m3 | fp8 / auto |", "|---|---:|---:|---:|"]

    def line(name: str, a, b) -> None:
        ratio = f"{b / a:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else ""
        fmt = lambda x: f"{x:,.0f}" if isinstance(x, (int, float)) else str(x)  # noqa: E731
        lines.append(f"| {name} | {fmt(a)} | {fmt(b)} | {ratio} |")

    line("KV tokens", auto.get("kv_tokens"), fp8.get("kv_tokens"))
    for w in ("w1", "long"):
        line(f"{w} out tok/s", auto.get(w, {}).get("out_tok_s"), fp8.get(w, {}).get("out_tok_s"))
    acc = fp8.get("accuracy")
    if acc:
        n, prompt, new = acc["greedy_seqs"], acc["greedy_prompt_tokens"], acc["greedy_new_tokens"]
        lines.append(f"accuracy vs bf16 cache ({n} x ({prompt} + {new}) tokens, teacher-forced): "
                     f"top-1 agreement {acc['top1_agreement']:.4f}, |logit error| mean "
                     f"{acc['mean_abs_logit_error']:.4f} max {acc['max_abs_logit_error']:.4f} (logit std "
                     f"{acc['reference_logit_std']:.3f}); greedy: {acc['greedy_equal_seqs']}/{n} sequences "
                     f"equal for all {new} tokens, first divergences {acc['greedy_first_divergence']}")
    if fp8.get("scales_source"):
        lines.append(f"fp8 scales from the {fp8['scales_source']}: {fp8['scale_min']:.3g} .. {fp8['scale_max']:.3g}")
    for kind in ("auto", "fp8_e4m3"):
        if "error" in res.get(kind, {}):
            lines.append(f"{kind} failed: {res[kind]['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m baton.bench.kv_fp8", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/tmp/m8b")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "kv_fp8.json"))
    p.add_argument("--engine", default="", help="extra EngineConfig options (JSON) for both engines")
    p.add_argument("--timeout", type=float, default=280.0, help="seconds each engine's child process may run")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (CPU, tiny model)")
    p.add_argument("--kind", default="", help=argparse.SUPPRESS)  # internal: one engine's run (a child)
    p.add_argument("--ref", default="", help=argparse.SUPPRESS)
    p.add_argument("--row", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.kind:
        run_child(args)
        return {}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    res: dict[str, Any] = {"gpu": gpu, "options": json.loads(args.engine or "{}"),
                           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for kind in ("auto", "fp8_e4m3"):
            res[kind] = run_in_child(args, kind, work / "reference.pt", work)
            print(kind, json.dumps(res[kind]), flush=True)
            Path(args.json).write_text(json.dumps(res, indent=1))
    print(table(res))
    return res


if __name__ == "__main__":
    main()
