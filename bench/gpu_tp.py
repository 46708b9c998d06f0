"""Tensor-parallel batch-1 decode on two GPUs against the 2-GPU bandwidth limit.

Runs on a machine with at least 2 GPUs (the device tool's `nvidia-h200-x2`) with the random-weight
Llama-3.1-8B-shaped bf16 model of `gpu_engine.py` (`--make-model`). Measures, in one run:

- the copy bandwidth of each GPU (4 GiB device-to-device, bytes read + written, median of 10), as
  `gpu_engine.ceilings` does: the limit is weight bytes / (2 x the slower GPU's bandwidth), since
  each rank streams half of the weights per token;
- batch-1 decode (one 128-token prompt, 512 tokens, greedy, EOS ignored) in tokens/s with `--tp 2`
  (ranks on cuda:0 and cuda:1), with decode CUDA graphs and eager, and, for reference, with `--tp 1`
  on cuda:0 (in a child process, which frees the GPU by exiting), with graphs and eager;
- the ratio of each to its limit (the TP=1 limit is weight bytes / one GPU's bandwidth).

Writes $OUT/gpu_tp.json (or --json) and prints it.

    python3 -m baton.bench.gpu_engine --make-model /tmp/m8b
    python3 -m baton.bench.gpu_tp --model /tmp/m8b
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

PROMPT_TOKENS, DECODE_TOKENS = 128, 512


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a 4 GiB device-to-device copy (median of 10)."""
    x = torch.randint(0, 255, (4 * 1024**3,), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    with torch.cuda.device(device):
        for _ in range(3):
            y.copy_(x)
        torch.cuda.synchronize(device)
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            y.copy_(x)
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b))
    del x, y
    torch.cuda.empty_cache()
    times.sort()
    return 2 * 4 * 1024**3 / (times[len(times) // 2] / 1e3)


def weight_bytes(folder: str) -> int:
    """Bytes of every tensor of the model folder (from the safetensors headers)."""
    from safetensors import safe_open
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                n = 1
                for d in s.get_shape():
                    n *= d
                total += n * 2  # bf16
    return total


def decode_tok_s(llm) -> float:
    from baton.services.engine import SamplingParams
    rng = random.Random(1)
    prompt = [rng.randrange(3, 128000) for _ in range(PROMPT_TOKENS)]
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))  # warm
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=DECODE_TOKENS, ignore_eos=True))[0]
    seconds = time.perf_counter() - start
    if out.error:
        raise RuntimeError(out.error)
    return len(out.outputs[0].token_ids) / seconds


def tp1(model: str) -> dict[str, float]:
    """TP=1 on cuda:0, graphs and eager (run in its own process: it frees the GPU by exiting)."""
    from baton.services.engine import LLM
    one = LLM(model, device="cuda", max_running_requests=8, mem_fraction_static=0.85)
    res = {}
    if one.engine.runner.graph_bs:
        res["tp1_graph_tok_s"] = decode_tok_s(one)
        one.engine.runner.use_graphs = False
    res["tp1_eager_tok_s"] = decode_tok_s(one)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the 8B-shaped folder (gpu_engine.py --make-model)")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_tp.json"))
    p.add_argument("--skip-tp1", action="store_true", help="measure TP=2 only")
    p.add_argument("--tp1-only", action="store_true", help=argparse.SUPPRESS)  # the TP=1 child
    args = p.parse_args(argv)
    if args.tp1_only:
        print(json.dumps(tp1(args.model)))
        return {}
    from baton.services.engine import LLM
    if torch.cuda.device_count() < 2:
        raise SystemExit("gpu_tp needs 2 GPUs")
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "prompt_tokens": PROMPT_TOKENS,
                           "decode_tokens": DECODE_TOKENS}
    bandwidth = [copy_bandwidth(torch.device("cuda", i)) for i in range(2)]
    res["copy_bytes_per_s"] = bandwidth
    res["weight_bytes"] = weights = weight_bytes(args.model)
    res["limit_tp2_tok_s"] = 2 * min(bandwidth) / weights
    res["limit_tp1_tok_s"] = bandwidth[0] / weights
    if not args.skip_tp1:
        child = subprocess.run([sys.executable, "-m", "baton.bench.gpu_tp", "--model", args.model, "--tp1-only"],
                               capture_output=True, text=True, check=True)
        res.update(json.loads(child.stdout.strip().splitlines()[-1]))
    two = LLM(args.model, device="cuda", tp_size=2, max_running_requests=8, mem_fraction_static=0.85)
    try:
        runner = two.engine.runner
        if runner.graph_bs:
            res["tp2_graph_tok_s"] = decode_tok_s(two)
            runner.use_graphs = False
        res["tp2_eager_tok_s"] = decode_tok_s(two)
    finally:
        two.engine.runner.close()
    res["tp2_tok_s"] = max(res.get("tp2_graph_tok_s", 0.0), res["tp2_eager_tok_s"])
    res["tp2_ratio"] = res["tp2_tok_s"] / res["limit_tp2_tok_s"]
    for key in ("tp2_graph_tok_s", "tp2_eager_tok_s"):
        if key in res:
            res[key.replace("_tok_s", "_ratio")] = res[key] / res["limit_tp2_tok_s"]
    for key in ("tp1_graph_tok_s", "tp1_eager_tok_s"):
        if key in res:
            res[key.replace("_tok_s", "_ratio")] = res[key] / res["limit_tp1_tok_s"]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
