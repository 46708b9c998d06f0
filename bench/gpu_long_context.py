"""Long-context sections of `bench.gpu_engine` (issue 17): decode attention over 8k / 32k
contexts against the KV-read bandwidth limit, and a 32k-token prefill through the engine
against vLLM in the same lease.

- l (kernel level, no engine, run before the model loads): the Triton decode kernel
  (`decode_attention`, the split count the backend picks) at batch 1 and 32 over contexts of
  8,192 and 32,768 tokens, Llama-3.1-8B's attention shape (32 query / 8 KV heads of 128, bf16,
  page 16, every sequence on randomly placed blocks). One "step" is 32 launches, one per layer,
  over distinct layer caches rotated so that no launch finds its KV in L2 (50 MB on an H200),
  captured in a CUDA graph (as decode runs in the engine) and timed by CUDA events, median of
  20 replays; eager launches are timed too. Bytes read = batch x context x 8 heads x 128 x 2
  (K and V) x 2 bytes per layer. The limit is a device-to-device copy of those same bytes (the
  same layer caches into scratch buffers, 32 copies per graph, same run): a copy reads and
  writes, so reading the bytes alone takes half the copy's time at the copy's read+write rate.
  Also reported against the 4 GiB copy of `ceil` when it ran. Target: >= 80% of the KV-read limit.
- p: one 32,768-token prompt through `LLM.generate` (max_tokens=1, default chunking unless
  `--engine` says otherwise): time to first token and prompt tokens/s, median of 3 prompts
  after a warm-up prompt (all different: no prefix hits), with the FLOP rate (linear layers +
  causal attention) over the bf16 matmul rate of `ceil`. vLLM's figure for the same prompts
  comes from `bench/vllm_long_prefill.py` ($OUT/vllm_long.json) when it ran earlier in the lease.

    python3 -m baton.bench.gpu_engine --make-model /tmp/m8b        # max_position_embeddings 131072
    PYTHONPATH=/tmp/vsite VLLM_USE_FLASHINFER_SAMPLER=0 python3 bench/vllm_long_prefill.py /tmp/m8b
    python3 -m baton.bench.gpu_engine --model /tmp/m8b --sections ceil,l,p
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAYERS = 32
KV_HEADS, HEADS, HEAD_DIM, PAGE = 8, 32, 128, 16
PREFILL_LEN = 32768


def long_prompts(length: int = PREFILL_LEN, count: int = 4, vocab: int = 128000) -> list[list[int]]:
    """The prefill section's prompts (bench/vllm_long_prefill.py draws the very same ones)."""
    rng = np.random.default_rng(17)
    return [rng.integers(3, vocab, length).tolist() for _ in range(count)]


def _graph_ms(launch, reps: int = 20) -> tuple[float, float]:
    """(graph replay ms, eager ms): medians of `reps` timed runs of `launch` (after warm-ups)."""
    for _ in range(3):
        launch()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        launch()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    torch.cuda.synchronize()

    from baton.bench.gpu_engine import median_ms  # gpu_engine imports this module at its top
    result = median_ms(graph.replay, reps=reps), median_ms(launch, reps=reps)
    del graph
    return result


def decode_case(batch: int, context: int, num_sms: int, splits: int = 0) -> dict[str, Any]:
    """One decode-attention case; `splits` > 0 overrides the engine's `num_decode_splits` choice."""
    from baton.services.engine.attention.triton_kernels import decode_attention, decode_workspace, num_decode_splits
    layer_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * 2  # K and V, bf16
    distinct = min(LAYERS, max(2, math.ceil(2 * 1024**3 / layer_bytes)))  # at least 2 GiB rotated: no L2 reuse
    blocks = batch * (context // PAGE)
    gen = torch.Generator(device="cuda").manual_seed(batch * 7 + context)
    keys = [torch.randn(blocks * PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(distinct)]
    values = [torch.randn_like(k) for k in keys]
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(batch + context))
    table = order.view(batch, context // PAGE).to(torch.int32).cuda()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    rows = torch.arange(batch, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(batch, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    chosen = num_decode_splits(batch, KV_HEADS, context, num_sms)
    splits = splits or chosen
    workspace = decode_workspace(batch, HEADS, splits, HEAD_DIM, torch.device("cuda")) if splits > 1 else None
    scale = HEAD_DIM ** -0.5

    def attention() -> None:
        for layer in range(LAYERS):
            i = layer % distinct
            decode_attention(q, keys[i], values[i], table, lens, PAGE, scale, q_rows=rows, out=out,
                             num_splits=splits, workspace=workspace)

    # destinations rotate too while they are small, so the copy's writes cannot settle in L2 either
    targets = distinct if layer_bytes * distinct <= 4 * 1024**3 else 1
    scratch = [(torch.empty_like(keys[0]), torch.empty_like(values[0])) for _ in range(targets)]

    def copy() -> None:
        for layer in range(LAYERS):
            i = layer % distinct
            dst_k, dst_v = scratch[layer % targets]
            dst_k.copy_(keys[i])
            dst_v.copy_(values[i])

    attn_graph, attn_eager = _graph_ms(attention)
    copy_graph, _ = _graph_ms(copy)
    read_limit_ms = copy_graph / 2  # the copy read and wrote the bytes; reading alone takes half
    total = layer_bytes * LAYERS
    result = {"batch": batch, "context": context, "splits": splits, "engine_splits": chosen,
              "distinct_layer_caches": distinct,
              "kv_bytes_per_step": total, "graph_ms": attn_graph, "eager_ms": attn_eager,
              "copy_same_bytes_ms": copy_graph, "kv_read_gb_s": total / (attn_graph / 1e3) / 1e9,
              "copy_rw_gb_s": 2 * total / (copy_graph / 1e3) / 1e9, "ratio": read_limit_ms / attn_graph,
              "ratio_eager": read_limit_ms / attn_eager}
    del keys, values, scratch, workspace
    torch.cuda.empty_cache()
    return result


def section_l(res: dict, batches=(1, 32), contexts=(8192, 32768), split_sweep=(), sweep_batches=(1,)) -> dict:
    """Each (batch, context) with the engine's split count, then, at each batch of `sweep_batches`, each count
    of `split_sweep` (`gpu_engine --decode-splits`): whether more programs in flight lift small-batch reads
    toward the limit."""
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    out: dict[str, Any] = {"shape": f"{HEADS}q/{KV_HEADS}kv heads x {HEAD_DIM}, bf16, page {PAGE}, {LAYERS} layers"}
    big_copy = res.get("ceil", {}).get("copy_bytes_per_s")
    for batch in batches:
        for context in contexts:
            case = decode_case(batch, context, num_sms)
            if big_copy:
                case["ratio_4gib_copy"] = case["kv_read_gb_s"] * 1e9 / big_copy
            out[f"b{batch}_ctx{context}"] = case
            print("l", json.dumps(case), flush=True)
    for batch in sweep_batches:
        for context in contexts:
            for splits in split_sweep:
                case = decode_case(batch, context, num_sms, splits)
                out[f"b{batch}_ctx{context}_s{splits}"] = case
                print("l", json.dumps(case), flush=True)
    return out


def vllm_long_reference() -> dict[str, Any] | None:
    """vLLM's 32k prefill from bench/vllm_long_prefill.py in this lease ($OUT/vllm_long.json), if it ran."""
    path = Path(os.environ.get("OUT", "/tmp")) / "vllm_long.json"
    return json.loads(path.read_text()).get("vllm") if path.exists() else None


def section_p(llm, res: dict) -> dict:
    from baton.bench.gpu_engine import greedy, timed_generate
    engine = llm.engine
    cfg = engine.model_config
    prompts = long_prompts(vocab=min(128000, cfg.vocab_size))
    linear = 2 * cfg.num_layers * cfg.hidden_size * (
        (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim + 3 * cfg.intermediate_size)
    attention = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * (PREFILL_LEN + 1) / 2  # causal, per token
    timed_generate(llm, prompts[:1], greedy(1))  # warm-up: compiles, first allocations
    times = []
    for prompt in prompts[1:]:
        seconds, _ = timed_generate(llm, [prompt], greedy(1))
        times.append(seconds)
    ttft = float(np.median(times))
    out: dict[str, Any] = {"prompt_tokens": PREFILL_LEN, "ttft_s": ttft, "times_s": times,
                           "tok_s": PREFILL_LEN / ttft, "flop_per_token": linear + attention,
                           "chunked_prefill_size": engine.config.chunked_prefill_size,
                           "max_num_batched_tokens": engine.config.max_num_batched_tokens,
                           "max_model_len": engine.runner.max_model_len}
    flops = res.get("ceil", {}).get("bf16_flops")
    if flops:
        out["matmul_ratio"] = out["tok_s"] * out["flop_per_token"] / flops
    ref = vllm_long_reference()
    if ref:
        out["vllm"] = ref
        out["vs_vllm"] = ref["ttft_s"] / ttft  # > 1: Baton's first token comes sooner
    return out


def long_context_table(res: dict) -> str:
    """Rows for the l and p sections, when they ran."""
    rows = []
    lsec = res.get("l")
    if isinstance(lsec, dict) and "error" not in lsec:
        rows += ["| (l) decode attention, 32 layers | KV read | limit (same-bytes copy) | ratio | target |",
                 "|---|---:|---:|---:|---|"]
        for key, c in lsec.items():
            if isinstance(c, dict):
                rows.append(f"| batch {c['batch']}, context {c['context']} ({c['splits']} splits) | "
                            f"{c['kv_read_gb_s']:.0f} GB/s ({c['graph_ms']:.3f} ms graph, {c['eager_ms']:.3f} eager) | "
                            f"{c['copy_rw_gb_s']:.0f} GB/s r+w | {c['ratio']:.1%} | >= 80% |")
    p = res.get("p")
    if isinstance(p, dict) and "error" not in p:
        ref = p.get("vllm")
        vs = f"vLLM {ref['ttft_s']:.3f} s (same run) | {p['vs_vllm']:.2f}x" if ref else "vLLM not run | "
        rows.append(f"| (p) 32k prefill, TTFT (chunks {p['chunked_prefill_size']}, budget "
                    f"{p['max_num_batched_tokens']}) | {p['ttft_s']:.3f} s, {p['tok_s']:.0f} tok/s, "
                    f"{p.get('matmul_ratio', float('nan')):.1%} of matmul | {vs} | |")
    return "\n".join(rows)
