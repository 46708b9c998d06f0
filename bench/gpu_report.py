"""The tables of `bench.gpu_engine`: its results against the GPU's ceilings, vLLM and transformers.

vLLM's figures come from peer_bench.py's `$OUT/peer.json` when it ran in the same lease,
else from the H200 figures of ../shared/peer/README.md, labelled as not this run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

VLLM_H200 = {"gpu": "NVIDIA H200", "date": "2026-11-21", "bs1_tok_s": 203.8, "w1_out_tok_s": 11749.0,
             "w2_out_tok_s": 10963.0, "hf_w2_out_tok_s": 1112.0, "copy_tb_s": 4.29}
"""vLLM 0.26 (and transformers 5.17) on the same workloads, from ../shared/peer/README.md (not this run)."""


def vllm_reference() -> dict[str, Any]:
    """vLLM's figures: those of peer_bench.py ($OUT/peer.json) when it ran earlier in this lease,
    else the peer README's H200 ones (labelled as not this run)."""
    path = Path(os.environ.get("OUT", "/tmp")) / "peer.json"
    peer = json.loads(path.read_text()).get("vllm") if path.exists() else None
    if peer:
        return {"w1_out_tok_s": peer["w1"]["out_tok_s"], "w2_out_tok_s": peer["w2"]["out_tok_s"],
                "bs1_tok_s": peer["bs1_tok_s"], "source": "same run"}
    return {**VLLM_H200, "source": "H200, peer README, not this run"}


def report(res: dict) -> str:
    rows = [f"GPU {res.get('gpu')}; torch {res.get('torch')}; triton {res.get('triton')}; {res.get('date')}"]
    c = res.get("ceil")
    if c:
        rows.append(f"ceilings: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write), "
                    f"bf16 matmul {c['bf16_flops'] / 1e12:.0f} TFLOP/s")
    rows.append("| measure | Baton | reference | ratio | target |")
    rows.append("|---|---:|---:|---:|---|")
    a = res.get("a")
    if isinstance(a, dict) and "ratio" in a:
        rows.append(f"| (a) batch-1 decode, CUDA graphs | {a.get('graph_tok_s', 0):.1f} tok/s | limit "
                    f"{a['limit_tok_s']:.1f} tok/s ({a['weight_bytes'] / 1e9:.2f} GB / copy bw) | "
                    f"{a['ratio']:.1%} | >= 85% |")
        ref = a.get("vllm", {})
        if ref.get("source") == "same run":  # another GPU's figure against this limit would mislead
            rows.append(f"| (a) vLLM 0.26 batch-1 decode (same run) | {ref['bs1_tok_s']:.1f} tok/s | limit "
                        f"{a['limit_tok_s']:.1f} tok/s | {ref['bs1_tok_s'] / a['limit_tok_s']:.1%} | |")
        rows.append(f"| (a) same, limit without the embedding table | | {a['limit_streamed_tok_s']:.1f} tok/s "
                    f"({a['streamed_bytes'] / 1e9:.2f} GB) | {a['ratio_streamed']:.1%} | |")
        rows.append(f"| (a) batch-1 decode, eager | {a['eager_tok_s']:.1f} tok/s | limit {a['limit_tok_s']:.1f} | "
                    f"{a['eager_tok_s'] / a['limit_tok_s']:.1%} | |")
        if "replay_ms" in a:
            rows.append(f"| (a) bare graph replay, batch 1 | {a['replay_ms']:.3f} ms/step | limit "
                        f"{1e3 / a['limit_tok_s']:.3f} ms | {a['replay_ratio']:.1%} | |")
    d = res.get("d")
    if isinstance(d, dict):
        for name in ("graph", "eager"):
            if name in d:
                x = d[name]
                rows.append(f"| (d) GPU idle between decode steps, batch {x['batch']}, {name} | "
                            f"{x['idle_ms']:.2f} ms of {x['period_ms']:.2f} ms/step (busy {x['busy_ms']:.2f}) | | "
                            f"{x['idle_frac']:.1%} idle | < 5% |")
    cc = res.get("c")
    if isinstance(cc, dict):
        rows.append(f"| (c) prefill 4096-token prompts, model steps | {cc['model_tok_s']:.0f} tok/s "
                    f"({cc['flop_per_token'] / 1e9:.1f} GFLOP/token) | bf16 matmul | {cc['model_ratio']:.1%} | >= 70% |")
        rows.append(f"| (c) same through LLM.generate (chunks {cc['chunked_prefill_size']}, "
                    f"budget {cc['max_num_batched_tokens']}) | {cc['engine_tok_s']:.0f} tok/s | bf16 matmul | "
                    f"{cc['engine_ratio']:.1%} | |")
    for key in sorted(k for k in res if k.startswith("b") and isinstance(res[k], dict) and "w1" in res[k]
                      and "_round" not in k):
        b = res[key]
        ref = b.get("vllm", {**VLLM_H200, "source": "H200, peer README, not this run"})
        opts = res.get(b.get("engine", ""), {}).get("options", {})
        shown = {k: v for k, v in opts.items() if k not in ("device", "skip_tokenizer_init")}
        rows.append(f"| (b) engine options: {json.dumps(shown) if shown else 'defaults'} | | | | |")
        rows.append(f"| (b) ShareGPT-like 1,000 prompts ({b['w1']['in_tokens']} in / {b['w1']['out_tokens']} out) | "
                    f"{b['w1']['out_tok_s']:.0f} out tok/s | vLLM 0.26 {ref['w1_out_tok_s']:.0f} "
                    f"({ref['source']}) | {b['vs_vllm_w1']:.2f}x | >= 1.1x |")
        rows.append(f"| (b) 300 prompts x 128 out | {b['w2']['out_tok_s']:.0f} out tok/s | vLLM 0.26 "
                    f"{ref['w2_out_tok_s']:.0f} ({ref['source']}) | {b['vs_vllm_w2']:.2f}x | |")
        hf = res.get("hf")
        if isinstance(hf, dict) and "out_tok_s" in hf:
            rows.append(f"| (b) 300 prompts x 128 out vs transformers (same run) | {b['w2']['out_tok_s']:.0f} | "
                        f"transformers paged|sdpa {hf['out_tok_s']:.0f} | "
                        f"{b['w2']['out_tok_s'] / hf['out_tok_s']:.1f}x | >= 10x |")
    for key, value in res.items():
        if isinstance(value, dict) and "error" in value:
            rows.append(f"| {key}: FAILED | {value['error'][:150]} | | | |")
    return "\n".join(rows)


def overlap_table(res: dict, tag: str = "") -> str:
    """The sections measured with overlap scheduling and without, side by side (same run)."""
    rows = ["| measure | overlap on | overlap off | on / off |", "|---|---:|---:|---:|"]

    def row(label: str, on: Any, off: Any, fmt: str, better_low: bool = False) -> None:
        if on is None or off is None:
            return
        ratio = (off / on if better_low else on / off) if on and off else float("nan")
        rows.append(f"| {label} | {on:{fmt}} | {off:{fmt}} | {ratio:.2f}x{' (lower is better)' if better_low else ''} |")

    a, a0 = res.get("a" + tag, {}), res.get("a" + tag + "_sync", {})
    for mode in ("graph", "eager"):
        row(f"(a) batch-1 decode, {mode}, tok/s", a.get(f"{mode}_tok_s"), a0.get(f"{mode}_tok_s"), ".1f")
    if a.get("limit_tok_s") and a.get("graph_tok_s") and a0.get("graph_tok_s"):
        rows.append(f"| (a) graphs, % of the bandwidth limit ({a['limit_tok_s']:.1f} tok/s) | "
                    f"{a['graph_tok_s'] / a['limit_tok_s']:.1%} | {a0['graph_tok_s'] / a['limit_tok_s']:.1%} | |")
    d, d0 = res.get("d" + tag, {}), res.get("d" + tag + "_sync", {})
    for mode in ("graph", "eager"):
        x, y = d.get(mode, {}), d0.get(mode, {})
        row(f"(d) batch {x.get('batch', 256)} decode, {mode}, GPU idle fraction", x.get("idle_frac"),
            y.get("idle_frac"), ".1%", better_low=True)
        row("(d) same, ms per step (period)", x.get("period_ms"), y.get("period_ms"), ".2f", better_low=True)
    b, b0 = res.get("b" + tag, {}), res.get("b" + tag + "_sync", {})
    for w, label in (("w1", "ShareGPT-like 1,000 prompts"), ("w2", "300 x 128")):
        row(f"(b) {label}, out tok/s", b.get(w, {}).get("out_tok_s"), b0.get(w, {}).get("out_tok_s"), ".0f")
    return "\n".join(rows)


