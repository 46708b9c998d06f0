"""Host time of one mixed engine step on CPU, as a function of the number of prefilling sequences.

Issue 17: the host work per step (scheduling, batch building, input tensors, block tables,
sampling bookkeeping, output processing) must not grow with the number of prefill chunks in
a step. This bench builds a tiny random-weight Llama (hidden 64, 2 layers, vocab 512, so
the model's own compute is small) and runs the real `Engine.step()` on CPU. Each row of the
table is one engine with D decoding requests running; each repetition adds P fresh prompts
of 2 * L tokens (L = --prefill-tokens / P), runs one untimed step that prefills their first
chunk (L tokens, `chunked_prefill_size` = L), then times the step that carries the D decode
tokens and the P final chunks (each over an L-token cached prefix; every one samples its
first token), then aborts the P requests. The step's token count is the same for every P.

Timing: `time.perf_counter` around `Engine.step()` and, through wrappers installed on the
engine's parts, around the phases inside it. The model forward and `compute_logits` are
device work on a GPU and are left out of "host". So is what only the CPU attention backend
needs (the torch reference backend reads per-sequence context slots and builds a padded
decode batch in its `prepare`; the GPU's Triton backend reads block tables): the wrapper runs
`ModelRunner.prepare` twice per step, first as on the GPU (block tables only: "prep"), then as
the CPU backend needs it; the second run and the backend's `prepare` are "CPU-only".
host = step - forward - logits - CPU-only. Columns: sched (`Scheduler.schedule`), prep (token
ids, positions, KV slots, block tables, sampled rows), sample (`Sampler.sample`, which on CPU
also does the argmax arithmetic), rest (engine bookkeeping and output processing:
detokenization unless --skip-tokenizer), host, host per sequence (host / (P + D)), the host
time of the step before (the same decodes with the P first chunks, just admitted: prefix
match and block allocation), CPU-only, and forward (ms). Medians over --reps. CPU-only can
come out slightly negative: the step's first `prepare` call (the GPU-path one) also pays the
cold caches and page faults after the previous step's forward, which the second one does not.
On a shared machine the figures move by 10-30% between runs; compare rows of one run.

    .venv/bin/python -m baton.bench.host_step_cpu                    # P in 1,4,16,64 x D in 0,64,256
    .venv/bin/python -m baton.bench.host_step_cpu --quick            # smoke test
    .venv/bin/python -m baton.bench.host_step_cpu --prefill-seqs 1,16,64 --decode-reqs 0,256 --reps 15
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

VOCAB = 512
PHASES = ("sched", "prep", "sample", "rest", "host")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m baton.bench.host_step_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--prefill-seqs", default="1,4,16,64", help="comma-separated P: prefill chunks per step")
    p.add_argument("--decode-reqs", default="0,64,256", help="comma-separated D: decode tokens per step")
    p.add_argument("--prefill-tokens", type=int, default=4096, help="prefill tokens per step, split evenly over P")
    p.add_argument("--reps", type=int, default=10, help="timed steps per row (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions per row first")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--skip-tokenizer", action="store_true", help="skip_tokenizer_init (no detokenization)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: P in 1,8, D in 0,16, 512 tokens, 3 reps")
    args = p.parse_args(argv)
    if args.quick:
        args.prefill_seqs, args.decode_reqs, args.prefill_tokens, args.reps, args.warmup = "1,8", "0,16", 512, 3, 1
    args.prefill_seqs = [int(x) for x in args.prefill_seqs.split(",")]
    args.decode_reqs = [int(x) for x in args.decode_reqs.split(",")]
    if min(args.prefill_seqs) < 1 or min(args.decode_reqs) < 0 or args.reps < 1:
        p.error("prefill seqs must be >= 1, decode reqs >= 0, reps >= 1")
    if any(args.prefill_tokens // n < 2 for n in args.prefill_seqs):
        p.error("--prefill-tokens must give every prefill sequence at least 2 tokens")
    return args


def make_model(folder: Path, max_len: int) -> Path:
    """A tiny random-weight Llama with a word-level tokenizer, saved in `folder`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(folder)
    return folder


class PhaseClock:
    """Accumulates wall time spent in wrapped callables, by label."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        inner: Callable = getattr(owner, name)
        totals = self.totals

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - t0

        setattr(owner, name, timed)


def build_engine(folder: Path, args: argparse.Namespace, chunk: int, decodes: int):
    from baton.services.engine.config import EngineConfig
    from baton.services.engine.engine import Engine
    budget = decodes + args.prefill_tokens
    config = EngineConfig(model=str(folder), device="cpu", page_size=args.page_size, chunked_prefill_size=chunk,
                          max_num_batched_tokens=budget, max_running_requests=decodes + max(args.prefill_seqs) + 8,
                          kv_cache_tokens=8 * budget + 64 * args.page_size * (decodes + 8),
                          num_threads=args.threads, skip_tokenizer_init=args.skip_tokenizer, random_seed=args.seed)
    return Engine(config)


def install_clock(engine) -> PhaseClock:
    """Time the step's phases; `ModelRunner.prepare` runs twice per step: first as the GPU path
    builds its inputs (block tables only, timed as "prep"), then as the CPU backend needs them
    (context slots too, timed as "prep_cpu" and left out of host)."""
    clock = PhaseClock()
    runner = engine.runner
    clock.wrap(engine.scheduler, "schedule", "sched")
    clock.wrap(runner.backend, "prepare", "attn_plan")
    clock.wrap(runner.model, "forward", "forward")
    clock.wrap(runner.model, "compute_logits", "logits")
    clock.wrap(engine.sampler, "sample", "sample")
    prepare, backend, totals = runner.prepare, runner.backend, clock.totals

    def timed_prepare(items):
        wanted = backend.uses_context_slots
        t0 = time.perf_counter()
        backend.uses_context_slots = False
        try:
            prepare(items)
        finally:
            backend.uses_context_slots = wanted
        t1 = time.perf_counter()
        inputs = prepare(items)
        totals["prep"] += t1 - t0
        totals["prep_cpu"] += time.perf_counter() - t1
        return inputs

    runner.prepare = timed_prepare
    return clock


def timed_step(engine, clock: PhaseClock) -> dict[str, float]:
    """One `Engine.step()`: its phases and host time in microseconds (see the module doc)."""
    gc.collect()
    clock.totals.clear()
    t0 = time.perf_counter()
    engine.step()
    step = time.perf_counter() - t0
    t = clock.totals
    device = t["forward"] + t["logits"]
    cpu_only = t["attn_plan"] + t["prep_cpu"]
    host = step - device - cpu_only
    row = {"sched": t["sched"], "prep": t["prep"], "sample": t["sample"], "host": host,
           "rest": host - t["sched"] - t["prep"] - t["sample"], "cpu_only": cpu_only - t["prep"], "forward": device}
    return {key: value * 1e6 for key, value in row.items()}


def measure_row(folder: Path, args: argparse.Namespace, prefills: int, decodes: int) -> dict[str, float]:
    """Median microseconds per phase of the timed mixed step (see the module doc); "first" is the
    host time of the step before it (the same decodes with the P first chunks, just admitted)."""
    from baton.services.engine.sampling_params import SamplingParams
    length = args.prefill_tokens // prefills
    engine = build_engine(folder, args, length, decodes)
    rng = random.Random(args.seed)
    params = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)
    for i in range(decodes):  # short prompts, prefilled before anything is timed
        engine.add_request(f"d{i}", [rng.randrange(3, VOCAB) for _ in range(rng.randrange(8, 64))], params)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.running_requests()) \
            or engine.scheduler.num_waiting:
        engine.step()
    clock = install_clock(engine)
    samples: dict[str, list[float]] = defaultdict(list)
    for rep in range(args.warmup + args.reps):
        ids = [f"p{rep}_{i}" for i in range(prefills)]
        for rid in ids:
            engine.add_request(rid, [rng.randrange(3, VOCAB) for _ in range(2 * length)], params)
        first = timed_step(engine, clock)  # the first chunks
        row = timed_step(engine, clock)  # the final chunks
        scheduled = engine.last_schedule
        assert len(scheduled) == prefills + decodes and sum(n for _, _, n in scheduled) == decodes + prefills * length, \
            f"the timed step is not the intended mix: {len(scheduled)} items"
        for rid in ids:
            engine.abort(rid)
        if rep < args.warmup:
            continue
        row["first"] = first["host"]
        for key, value in row.items():
            samples[key].append(value)
    return {key: statistics.median(values) for key, values in samples.items()}


def table(results: list[tuple[int, int, dict[str, float]]], length_of: Callable[[int], int]) -> str:
    """The markdown table of the rows (see the module doc for the columns)."""
    head = ("| P prefill | chunk | D decode | sched us | prep us | sample us | rest us | host us | host us/seq |"
            " host us, first chunks | CPU-only us | forward ms |")
    lines = [head, "|" + "---:|" * 12]
    for prefills, decodes, r in results:
        lines.append(f"| {prefills} | {length_of(prefills)} | {decodes} | {r['sched']:.0f} | {r['prep']:.0f} | "
                     f"{r['sample']:.0f} | {r['rest']:.0f} | {r['host']:.0f} | {r['host'] / (prefills + decodes):.1f} | "
                     f"{r['first']:.0f} | {r['cpu_only']:.0f} | {r['forward'] / 1e3:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[tuple[int, int, dict[str, float]]]:
    """Run the rows, print the table; returns (P, D, median microseconds by column) per row."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    max_len = 2 * args.prefill_tokens // min(args.prefill_seqs) + args.warmup + args.reps + 256
    results = []
    with tempfile.TemporaryDirectory(prefix="host_step_") as tmp:
        folder = make_model(Path(tmp), max_len)
        for prefills in args.prefill_seqs:
            for decodes in args.decode_reqs:
                results.append((prefills, decodes, measure_row(folder, args, prefills, decodes)))
                print(f"P={prefills} D={decodes}: host {results[-1][2]['host']:.0f} us", file=sys.stderr, flush=True)
    print(f"host_step_cpu: {args.prefill_tokens} prefill tokens per step, page {args.page_size}, "
          f"{args.reps} reps (median), torch threads {args.threads}, tokenizer {'off' if args.skip_tokenizer else 'on'}")
    print(table(results, lambda p: args.prefill_tokens // p))
    return results


if __name__ == "__main__":
    main()
