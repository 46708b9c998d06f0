"""Baton's engine on one GPU, against the GPU's own ceilings measured in the same run.

Runs on the device machine with a random-weight Llama-3.1-8B-shaped model in bf16 (built
on the GPU by `--make-model` and saved as a safetensors folder, loaded through the engine's
normal loader). Sections (`--sections`, in this order):

- ceil: device copy bandwidth (4 GiB device-to-device, bytes read + written) and the bf16
  matmul rate (8192^3 on random data), medians of 10 timed runs after warm-ups;
- a: batch-1 decode (one 128-token prompt, 512 tokens, greedy, EOS ignored) in tokens/s,
  with CUDA graphs and eager, against the bandwidth limit (weight bytes / copy bandwidth);
  also the GPU time of one bare graph replay;
- d: scheduler overhead at batch 256: CUDA events around each step's device work
  (`ModelRunner.timing`) give, per decode step, the busy time (first copy to logits) and
  the period between step starts; idle = period - busy (sampling kernels count as idle);
- c: prefill of 4096-token prompts: the model alone (one 4096-token step per prompt) and
  the engine (`LLM.generate`, max_tokens=1, default chunking), in FLOP/s over the matmul rate;
- b: offline throughput on the ShareGPT-like workload of ../shared/peer/peer_bench.py
  (1,000 prompts, log-normal lengths, fixed outputs, EOS ignored; the same numpy seed, so
  the same prompts) and its 300 x 128 workload;
- l, p (`gpu_long_context.py`): decode attention at 8k / 32k contexts against the KV-read
  limit (kernel level, before the model loads), and a 32k-token prefill against vLLM;
- hf (a separate invocation, `--hf`, after the engine's process has freed the GPU):
  transformers' continuous batching (`generate_batch`, paged|sdpa) on the 300 x 128 workload.

`--overlap both` runs every section with overlap scheduling and again without (keys + `_sync`)
and prints the two side by side; `--rounds 2` runs everything twice and keeps the second round
(the first pays Triton's per-shape kernel compiles, which would bias the mode measured first).

Every section writes into $OUT/gpu_engine.json (or --json); the last invocation prints the table.

    python3 -m baton.bench.gpu_engine --make-model /tmp/m8b
    python3 -m baton.bench.gpu_engine --model /tmp/m8b --sections ceil,a,d,c,b
    python3 -m baton.bench.gpu_engine --model /tmp/m8b --hf
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
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from baton.bench.gpu_long_context import long_context_table, section_l, section_p  # noqa: E402
from baton.bench.gpu_report import overlap_table, report, vllm_reference  # noqa: E402


def make_model(out: str) -> dict[str, Any]:
    """A random-weight Llama-3.1-8B-shaped bf16 model built on the GPU, saved with a word-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                      bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg)
        for p in model.parameters():
            if p.dim() > 1:
                p.data.normal_(0, 0.02)
    torch.set_default_dtype(torch.float32)
    torch.cuda.synchronize()
    t1 = time.time()
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    return {"params": n, "bytes": 2 * n, "init_s": round(t1 - t0, 1), "save_s": round(time.time() - t1, 1)}


def median_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def ceilings() -> dict[str, float]:
    x = torch.randint(0, 255, (4 * 1024**3,), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_ms = median_ms(lambda: y.copy_(x))
    del x, y
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = median_ms(lambda: m @ m)
    del m
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": 2 * 4 * 1024**3 / (copy_ms / 1e3), "bf16_flops": 2 * 8192**3 / (mm_ms / 1e3)}


def workloads() -> tuple[tuple[list[list[int]], list[int]], tuple[list[list[int]], list[int]]]:
    """peer_bench.py's workloads, draw for draw: (ShareGPT-like 1,000 prompts, 300 x 128)."""
    rng = np.random.default_rng(0)
    n1 = 1000
    ins = np.clip(rng.lognormal(np.log(180), 0.9, n1), 4, 1024).astype(int)
    outs = np.clip(rng.lognormal(np.log(150), 0.9, n1), 4, 1024).astype(int)
    p1 = [rng.integers(3, 128000, int(n)).tolist() for n in ins]
    n2 = 300
    ins2 = np.clip(rng.lognormal(np.log(180), 0.9, n2), 4, 1024).astype(int)
    p2 = [rng.integers(3, 128000, int(n)).tolist() for n in ins2]
    return (p1, outs.tolist()), (p2, [128] * n2)


def greedy(max_tokens: int):
    from baton.services.engine import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True)


def timed_generate(llm, prompts, params) -> tuple[float, int]:
    """(seconds, output tokens) of one `generate` (synchronized on CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    errors = [o.error for o in outputs if o.error]
    if errors:
        raise RuntimeError(errors[0])
    return seconds, sum(len(o.outputs[0].token_ids) for o in outputs)


# --- sections ---------------------------------------------------------------------------

def section_a(llm, res: dict) -> dict:
    runner = llm.engine.runner
    rng = random.Random(1)
    prompt = [rng.randrange(3, 128000) for _ in range(128)]
    out: dict[str, Any] = {}
    modes = [("graph", True), ("eager", False)] if runner.graph_bs else [("eager", False)]
    for name, use in modes:
        runner.use_graphs = use
        timed_generate(llm, [prompt], greedy(16))
        seconds, tokens = timed_generate(llm, [prompt], greedy(512))
        out[f"{name}_tok_s"] = tokens / seconds
    runner.use_graphs = bool(runner.graph_bs)
    if runner.graph_bs:
        graph = runner.graphs[runner.graph_bs[0]]
        runner.reset_graph_inputs()  # padding rows: the bare replays store no K/V
        out["replay_ms"] = median_ms(graph.replay, warmup=5, reps=50)
    weights = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
    embedding = llm.engine.runner.model.model.embed_tokens.weight
    out["weight_bytes"] = weights
    out["streamed_bytes"] = weights - embedding.numel() * embedding.element_size()
    bw = res["ceil"]["copy_bytes_per_s"]
    out["limit_tok_s"] = bw / weights
    out["limit_streamed_tok_s"] = bw / out["streamed_bytes"]
    best = out.get("graph_tok_s", out["eager_tok_s"])
    out["ratio"] = best / out["limit_tok_s"]
    out["ratio_streamed"] = best / out["limit_streamed_tok_s"]
    out["vllm"] = vllm_reference()
    if "replay_ms" in out:
        out["replay_ratio"] = (1e3 / out["replay_ms"]) / out["limit_tok_s"]
    return out


def section_d(llm, res: dict, batch: int = 256, steps: int = 40) -> dict:
    engine = llm.engine
    runner = engine.runner
    rng = random.Random(2)
    for i in range(batch):
        engine.add_request(f"d{i}", [rng.randrange(3, 128000) for _ in range(256)], greedy(steps + 40))
    while True:  # prefill everything, until a step is decode-only at full batch
        engine.step()
        sched = engine.last_schedule
        if len(sched) == batch and all(n == 1 for _, _, n in sched):
            break
    for _ in range(5):
        engine.step()
    out: dict[str, Any] = {}
    for name, use in ([("graph", True), ("eager", False)] if runner.graph_bs else [("eager", False)]):
        runner.use_graphs = use
        engine.step()
        runner.timing = []
        torch.cuda.synchronize()
        walls = []
        for _ in range(steps // 2):
            t = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        events, runner.timing = runner.timing, None
        busy = [s.elapsed_time(e) for s, e in events]
        period = [events[i][0].elapsed_time(events[i + 1][0]) for i in range(len(events) - 1)]
        idle = [p - b for p, b in zip(period, busy)]
        out[name] = {"steps": len(period), "period_ms": float(np.mean(period)), "busy_ms": float(np.mean(busy[:-1])),
                     "idle_ms": float(np.mean(idle)), "idle_frac": float(np.sum(idle) / np.sum(period)),
                     "wall_ms": 1e3 * float(np.mean(walls)), "batch": len(engine.last_schedule)}
    runner.use_graphs = bool(runner.graph_bs)
    for i in range(batch):
        engine.abort(f"d{i}")
    return out


def section_c(llm, res: dict, prompts: int = 8, length: int = 4096) -> dict:
    from baton.services.engine.request import Request
    from baton.services.engine.scheduling.scheduler import ScheduledItem
    engine = llm.engine
    cfg = engine.model_config
    rng = random.Random(4)
    data = [[rng.randrange(3, 128000) for _ in range(length)] for _ in range(prompts + 1)]
    page = engine.config.page_size
    linear = 2 * cfg.num_layers * cfg.hidden_size * (
        (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim + 3 * cfg.intermediate_size)
    attention = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * (length + 1) / 2  # causal, per token
    flop_per_token = linear + attention
    out: dict[str, Any] = {"flop_per_token": flop_per_token}
    # the model alone: one 4096-token step per prompt
    blocks = engine.pool.allocate(-(-length // page))
    times = []
    for i, prompt in enumerate(data):
        req = Request(request_id=f"c{i}", parent_id=f"c{i}", index=0, prompt_token_ids=prompt, params=greedy(1),
                      arrival=i)
        req.block_table = blocks
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.runner.execute([ScheduledItem(req, 0, length)])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    engine.pool.release(blocks)
    step = float(np.median(times[1:]))
    out["model_tok_s"] = length / step
    out["model_ratio"] = out["model_tok_s"] * flop_per_token / res["ceil"]["bf16_flops"]
    # the engine: LLM.generate with its default chunking (warm-up: one prompt of the same length)
    timed_generate(llm, [[(t + 7) % (cfg.vocab_size - 3) + 3 for t in data[0]]], greedy(1))
    seconds, _ = timed_generate(llm, data[1:], greedy(1))
    out["engine_tok_s"] = prompts * length / seconds
    out["engine_ratio"] = out["engine_tok_s"] * flop_per_token / res["ceil"]["bf16_flops"]
    out["chunked_prefill_size"] = engine.config.chunked_prefill_size
    out["max_num_batched_tokens"] = engine.config.max_num_batched_tokens
    return out


def section_b(llm, res: dict) -> dict:
    w1, w2 = workloads()
    vocab = llm.engine.model_config.vocab_size
    timed_generate(llm, [[(t + 11) % (vocab - 3) + 3 for t in p] for p in w2[0][-64:]], greedy(8))  # warm-up
    out: dict[str, Any] = {}
    for name, (prompts, outs) in (("w1", w1), ("w2", w2)):
        seconds, tokens = timed_generate(llm, prompts, [greedy(o) for o in outs])
        out[name] = {"s": seconds, "out_tokens": tokens, "in_tokens": sum(map(len, prompts)),
                     "out_tok_s": tokens / seconds}
    out["vllm"] = ref = vllm_reference()
    out["vs_vllm_w1"] = out["w1"]["out_tok_s"] / ref["w1_out_tok_s"]
    out["vs_vllm_w2"] = out["w2"]["out_tok_s"] / ref["w2_out_tok_s"]
    return out


HF_SCRIPT = r'''
import json, sys, time, torch
from transformers import AutoModelForCausalLM, GenerationConfig
sys.path.insert(0, sys.argv[2])
from baton.bench.gpu_engine import workloads
w1, w2 = workloads()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="cuda",
                                         attn_implementation="paged|sdpa").eval()
gc = GenerationConfig(max_new_tokens=128, min_new_tokens=128, do_sample=False, eos_token_id=None, pad_token_id=0)
m.generate_batch(inputs=w2[0][:4], generation_config=gc)
t = time.perf_counter(); r = m.generate_batch(inputs=w2[0], generation_config=gc); dt = time.perf_counter() - t
n = sum(len(v.generated_tokens) for v in r.values())
print("RESULT " + json.dumps({"s": dt, "out_tokens": n, "out_tok_s": n / dt}))
'''


def section_hf(model: str, timeout: float) -> dict:
    script = Path("/tmp/baton_hf_bench.py")
    script.write_text(HF_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), model, str(Path(__file__).resolve().parent.parent)],
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"transformers run failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m baton.bench.gpu_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/tmp/m8b")
    p.add_argument("--make-model", default="", help="build the random 8B model into this folder (if missing) and exit")
    p.add_argument("--sections", default="ceil,a,d,c,b")
    p.add_argument("--hf", action="store_true", help="run the transformers reference (alone) and print the table")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "gpu_engine.json"))
    p.add_argument("--deadline", type=float, default=540.0, help="start no section after this many seconds")
    p.add_argument("--engine", default="", help="extra EngineConfig options as JSON")
    p.add_argument("--decode-splits", default="", help="section l: also time batch-1 decode attention with each of "
                   "these split counts (comma-separated), beside the engine's own choice")
    p.add_argument("--decode-split-batches", default="1", help="section l: the batch sizes (comma-separated) that "
                   "--decode-splits sweeps")
    p.add_argument("--tag", default="", help="suffix of this invocation's section keys (another engine config)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the sections this many times (in the same order) and keep the last round: the first "
                        "rounds warm Triton's per-shape kernel compiles, which otherwise bias the first mode measured")
    p.add_argument("--overlap", default="on", choices=["on", "off", "both"],
                   help="overlap scheduling in the sections; both: each section with it, then without (keys + _sync)")
    args = p.parse_args(argv)
    if args.make_model:
        if not (Path(args.make_model) / "config.json").exists():
            print(json.dumps(make_model(args.make_model)), flush=True)
        return {}
    began = time.time()
    path = Path(args.json)
    res: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    import triton
    res.update(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    def save():
        path.write_text(json.dumps(res, indent=1))

    if args.hf:
        try:
            res["hf"] = section_hf(args.model, timeout=max(60.0, args.deadline - (time.time() - began)))
        except Exception as error:  # noqa: BLE001 - reported in the table
            res["hf"] = {"error": repr(error)}
        save()
        print(report(res))
        return res
    sections = [s for s in args.sections.split(",") if s]
    if "ceil" in sections:
        res["ceil"] = ceilings()
        print("ceil", json.dumps(res["ceil"]), flush=True)
        save()
    if "l" in sections:
        try:
            res["l"] = section_l(res, split_sweep=[int(x) for x in args.decode_splits.split(",") if x],
                                 sweep_batches=[int(x) for x in args.decode_split_batches.split(",") if x])
        except Exception as error:  # noqa: BLE001 - reported in the table
            res["l"] = {"error": repr(error)}
        save()
    table = {"a": section_a, "d": section_d, "c": section_c, "b": section_b, "p": section_p}
    if not any(name in table for name in sections):
        print(report(res) + "\n" + long_context_table(res))
        return res
    from baton.services.engine import LLM
    options = dict(device="cuda", skip_tokenizer_init=True)
    options.update(json.loads(args.engine or "{}"))
    t = time.time()
    llm = LLM(model=args.model, **options)
    res["engine" + args.tag] = {"load_s": time.time() - t, "options": options,
                     "kv_tokens": llm.engine.pool.num_blocks * llm.engine.config.page_size,
                     "graph_bs": llm.engine.runner.graph_bs,
                     "gemv_choices": getattr(llm.engine.runner.model, "gemv_choices", None)}
    print("engine", json.dumps(res["engine" + args.tag]), flush=True)
    save()
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.overlap]
    plan = [(r, name, overlap) for r in range(args.rounds) for name in sections if name in table
            for overlap in (modes if r % 2 == 0 else modes[::-1])]  # odd rounds: the other mode first
    for round_, name, overlap in plan:
        key = name + args.tag + ("_sync" if args.overlap == "both" and not overlap else "")
        if round_ < args.rounds - 1:
            key += f"_round{round_}"
        if time.time() - began > args.deadline:
            res[key] = {"error": "skipped: past the deadline"}
            continue
        llm.engine.flush()
        llm.engine.overlap_schedule = overlap
        t = time.time()
        try:
            res[key] = table[name](llm, res)
            res[key]["section_s"] = time.time() - t
            res[key]["engine"] = "engine" + args.tag
            res[key]["overlap"] = overlap
        except Exception as error:  # noqa: BLE001 - reported in the table, the other sections still run
            import traceback
            traceback.print_exc()
            res[key] = {"error": repr(error)}
        print(key, json.dumps(res[key]), flush=True)
        save()
    del llm
    gc.collect()
    print(report(res))
    print(long_context_table(res))
    if args.overlap == "both":
        print(overlap_table(res, args.tag))
    return res


if __name__ == "__main__":
    main()
