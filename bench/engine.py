"""Offline throughput: Baton's engine vs Hugging Face transformers `generate`, same model, same run.

Measures the wall time (time.perf_counter) of generating a fixed number of tokens for a
batch of prompts on CPU, once with Baton's offline `LLM.generate` (continuous batching over
the paged KV cache) and once with transformers' batched `generate` (left padding, greedy),
after a small warm-up on each side. Prompts are random token ids of mixed lengths drawn
from `--seed`; both sides run greedy with EOS ignored, so each produces exactly
num_prompts * output_len tokens. Reports per side total seconds, output tokens/s and total
(input + output) tokens/s, and the ratio Baton/HF of output tokens/s. As a cheap
correctness check, Baton's tokens for the first 4 prompts are compared with HF's greedy
tokens for the same prompts run unpadded one by one.

    .venv/bin/python -m baton.bench.engine                     # SmolLM2-135M, 32 prompts, 64 tokens
    .venv/bin/python -m baton.bench.engine --quick             # smoke test: 8 prompts, 16 tokens
    .venv/bin/python -m baton.bench.engine --results bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from baton.bench.machine import describe_machine  # noqa: E402

NUM_CHECKED = 4
"""Prompts whose Baton tokens are compared with unpadded HF greedy tokens."""


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m baton.bench.engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="HF model folder; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--min-input", type=int, default=16, help="shortest prompt, in tokens")
    p.add_argument("--max-input", type=int, default=256, help="longest prompt, in tokens")
    p.add_argument("--output-len", type=int, default=64, help="tokens generated per prompt (EOS ignored)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt lengths and token ids")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, both sides")
    p.add_argument("--hf-batch-size", type=int, default=0, help="HF generate batch size; default: all prompts")
    p.add_argument("--results", default="", help="append a markdown section to this file")
    p.add_argument("--quick", action="store_true", help="smoke test: 8 prompts, output 16")
    args = p.parse_args(argv)
    if args.quick:
        args.num_prompts, args.output_len = 8, 16
    if not 1 <= args.min_input <= args.max_input:
        p.error("need 1 <= --min-input <= --max-input")
    if args.num_prompts < 1 or args.output_len < 1 or args.threads < 1:
        p.error("--num-prompts, --output-len and --threads must be positive")
    args.hf_batch_size = args.hf_batch_size or args.num_prompts
    return args


def make_prompts(num: int, min_len: int, max_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token-id prompts with lengths uniform in [min_len, max_len], reproducible from seed."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(min_len, max_len))] for _ in range(num)]


def run_baton(model: str, prompts: list[list[int]], warmup: list[int], output_len: int,
              threads: int) -> tuple[float, list[list[int]]]:
    """Seconds of one `LLM.generate` over all prompts (after a warm-up) and the generated tokens."""
    from baton.services.engine import LLM, SamplingParams
    llm = LLM(model=model, num_threads=threads)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([warmup], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    errors = [o.error for o in outputs if o.error]
    if errors:
        raise RuntimeError(f"Baton refused a prompt: {errors[0]}")
    return seconds, [list(o.outputs[0].token_ids) for o in outputs]


def greedy_config(model, new_tokens: int, ignore_eos: bool):
    """A greedy GenerationConfig for exactly `new_tokens` tokens."""
    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.max_new_tokens = False, new_tokens
    config.temperature = config.top_p = config.top_k = None
    if config.pad_token_id is None:
        eos = config.eos_token_id if config.eos_token_id is not None else model.config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    if ignore_eos:
        config.eos_token_id = [10**9]  # never produced: no EOS check and no EOS suppression
    else:
        config.min_new_tokens = new_tokens
    return config


def run_hf(model, prompts: list[list[int]], output_len: int, batch_size: int) -> tuple[float, int]:
    """Seconds of batched, left-padded greedy `generate` over all prompts; and tokens generated."""
    config = greedy_config(model, output_len, ignore_eos=False)  # min_new_tokens = max_new_tokens
    with torch.no_grad():
        model.generate(torch.tensor([[1, 2, 3, 4]]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                       generation_config=greedy_config(model, 2, ignore_eos=False))
        generated = 0
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), config.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, prompt in enumerate(batch):
                ids[row, width - len(prompt):] = torch.tensor(prompt)
                mask[row, width - len(prompt):] = 1
            out = model.generate(ids, attention_mask=mask, generation_config=config)
            generated += (out.shape[1] - width) * len(batch)
        seconds = time.perf_counter() - start
    return seconds, generated


def hf_unpadded(model, prompt: list[int], output_len: int) -> list[int]:
    """HF greedy tokens for one prompt, unpadded, EOS ignored (Baton's ignore_eos semantics)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             generation_config=greedy_config(model, output_len, ignore_eos=True))
    return out[0, len(prompt):].tolist()


def side(seconds: float, input_tokens: int, output_tokens: int) -> dict[str, float]:
    return {"seconds": seconds, "output_tokens": output_tokens, "output_tps": output_tokens / seconds,
            "total_tps": (input_tokens + output_tokens) / seconds}


def machine() -> str:
    import transformers
    return describe_machine(f"transformers {transformers.__version__}")


def table(result: dict[str, Any]) -> str:
    rows = ["| engine | seconds | output tok/s | total tok/s | output tokens |", "|---|---:|---:|---:|---:|"]
    for name, key in (("Baton", "baton"), ("HF transformers generate", "hf")):
        s = result[key]
        rows.append(f"| {name} | {s['seconds']:.2f} | {s['output_tps']:.1f} | {s['total_tps']:.1f} "
                    f"| {s['output_tokens']} |")
    return "\n".join(rows)


def summary(result: dict[str, Any]) -> str:
    c = result["correctness"]
    return (f"Baton/HF output tok/s ratio: **{result['ratio']:.2f}x**  \n"
            f"Greedy check: {c['matched']}/{c['checked']} of the first prompts match HF unpadded exactly.")


def append_results(path: Path, result: dict[str, Any]) -> None:
    if not path.exists():
        path.write_text("# Benchmark results\n\nEvery result lists the exact command, the machine, the date (UTC) "
                        "and a ratio to a reference measured in the same run on the same machine, so numbers "
                        "from different machines are compared through their ratios, not their raw values.\n")
    w = result["workload"]
    section = (f"\n## Engine throughput vs HF generate ({Path(result['model']).name}, {result['date']})\n\n"
               f"- Command: `{result['command']}`\n- Machine: {result['machine']}\n- Date: {result['date']}\n"
               f"- Workload: {w['num_prompts']} prompts of {w['min_input']}..{w['max_input']} random tokens "
               f"({w['input_tokens']} in total, seed {w['seed']}), {w['output_len']} output tokens each, "
               f"greedy, EOS ignored; {w['threads']} threads; HF batch size {w['hf_batch_size']}\n\n"
               f"{table(result)}\n\n{summary(result)}\n")
    with path.open("a") as f:
        f.write(section)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark; prints the table, optionally appends to --results; returns the result dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM
    model = args.model
    if not model:
        from baton.services.engine.default_model import ensure_default_model
        model = str(ensure_default_model())
    vocab = AutoConfig.from_pretrained(model).vocab_size
    prompts = make_prompts(args.num_prompts, args.min_input, args.max_input, vocab, args.seed)
    warmup = make_prompts(1, args.min_input, args.min_input, vocab, args.seed + 1)[0]
    input_tokens = sum(len(p) for p in prompts)
    expected = args.num_prompts * args.output_len

    baton_s, baton_tokens = run_baton(model, prompts, warmup, args.output_len, args.threads)
    gc.collect()
    torch.set_num_threads(args.threads)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    hf_s, hf_generated = run_hf(hf, prompts, args.output_len, args.hf_batch_size)
    matches = [hf_unpadded(hf, p, args.output_len) == t
               for p, t in zip(prompts[:NUM_CHECKED], baton_tokens[:NUM_CHECKED])]

    baton = side(baton_s, input_tokens, sum(len(t) for t in baton_tokens))
    ref = side(hf_s, input_tokens, hf_generated)
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    result = {
        "model": model, "command": f"{exe} -m bench.engine {shlex.join(argv)}".strip(),
        "machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "workload": {"num_prompts": args.num_prompts, "min_input": args.min_input, "max_input": args.max_input,
                     "output_len": args.output_len, "seed": args.seed, "threads": args.threads,
                     "hf_batch_size": args.hf_batch_size, "input_tokens": input_tokens,
                     "expected_output_tokens": expected},
        "baton": baton, "hf": ref, "ratio": baton["output_tps"] / ref["output_tps"],
        "correctness": {"checked": len(matches), "matched": sum(matches), "matches": matches},
    }
    print(table(result))
    print()
    print(summary(result))
    if baton["output_tokens"] != expected or ref["output_tokens"] != expected:
        print(f"WARNING: expected {expected} output tokens per side", file=sys.stderr)
    if args.results:
        append_results(Path(args.results), result)
    return result


if __name__ == "__main__":
    main()
