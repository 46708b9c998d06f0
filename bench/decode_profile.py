"""Where one batch-1 decode step's GPU time goes, and how fast each weight stream can run.

Runs on the device machine (CUDA). Three parts, each printed and saved in
$OUT/decode_profile.json:

- `sweep`: for every linear shape of the Llama-3.1-8B decoder (and the LM head), one token's
  GEMV through cuBLAS (`torch.mm`) and through `services.engine.models.gemv` over a grid of
  tile configs, in TB/s of weight bytes (16 weight copies in rotation so nothing is served
  from L2), each config's 16 launches captured in a CUDA graph;
- `chain`: a 32-layer chain of one decoder layer's four projections for 1, 2 and 4 tokens in a
  CUDA graph, cuBLAS + `silu_and_mul` against the Triton GEMV (default configs, fused SiLU),
  against the device copy bandwidth measured in the same run;
- `profile` (`--model`): batch-1 greedy decode of the engine under torch.profiler, the GPU
  time per step by kernel and the gaps between kernels.

    python3 -m baton.bench.decode_profile --parts sweep,chain,profile --model /tmp/m8b
"""
from __future__ import annotations

import argparse
import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from baton.bench.gpu_engine import ceilings, greedy
from baton.services.engine.models.gemv_tuning import graph_ms

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
CONFIGS = [(bn, bk, w, s) for bn in (1, 2, 4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8) for s in (1, 3)]


def _rotating(n: int, k: int, copies: int) -> list[torch.Tensor]:
    return [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]


def gemv_sweep(copy_bw: float) -> dict[str, Any]:
    """Per shape: 16 GEMVs over 16 weight copies in one CUDA graph, cuBLAS vs every Triton config."""
    from baton.services.engine.models.gemv import PRO_SILU_MUL, gemv
    out: dict[str, Any] = {}
    for name, (n, k) in SHAPES.items():
        copies = 1 if name == "lm_head" else 16
        weights = _rotating(n, k, copies)
        pro = PRO_SILU_MUL if name == "down" else 0
        x = torch.randn(1, 2 * k if pro else k, dtype=torch.bfloat16, device="cuda")
        xin = x[:, :k].contiguous()
        nbytes = n * k * 2 * copies
        row = {"cublas_tb_s": nbytes / graph_ms(lambda: [torch.mm(xin, w.t()) for w in weights], replays=10) / 1e9}
        rates = {}
        for cfg in CONFIGS:
            try:
                ms = graph_ms(lambda: [gemv(x, w, pro, config=cfg) for w in weights], replays=10)
            except Exception as error:  # noqa: BLE001 - a config the compiler refuses is skipped
                row.setdefault("errors", []).append(f"{cfg}: {type(error).__name__}")
                continue
            rates[cfg] = nbytes / ms / 1e9
        best = max(rates, key=rates.get)
        ref = torch.mm(xin if not pro else _silu(x, k), weights[0].t())
        got = gemv(x, weights[0], pro, config=best)
        row.update(triton_tb_s=rates[best], best_config=best, copy_tb_s=copy_bw / 1e12,
                   top5=[(c, round(r / 1e3, 3)) for c, r in sorted(rates.items(), key=lambda kv: -kv[1])[:5]],
                   max_rel_err=float(((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()))
        out[name] = row
        print(name, json.dumps(row), flush=True)
        del weights
        torch.cuda.empty_cache()
    return out


def _silu(x: torch.Tensor, k: int) -> torch.Tensor:
    from baton.services.engine.models.triton_ops import silu_and_mul
    return silu_and_mul(x)


def layer_chain(copy_bw: float, rows: int = 1, layers: int = 32) -> dict[str, Any]:
    """32 layers of qkv, o, gate_up, (silu,) down for `rows` tokens in one CUDA graph: cuBLAS
    (+ silu_and_mul) against the Triton GEMV with its default configs and fused SiLU."""
    from baton.services.engine.models.gemv import PRO_SILU_MUL, gemv
    from baton.services.engine.models.triton_ops import silu_and_mul
    names = ("qkv", "o", "gate_up", "down")
    weights = [{nm: torch.randn(*SHAPES[nm], dtype=torch.bfloat16, device="cuda") * 0.02 for nm in names}
               for _ in range(layers)]
    nbytes = sum(w.numel() * 2 for layer in weights for w in layer.values())
    h = torch.randn(rows, 4096, dtype=torch.bfloat16, device="cuda")

    def cublas():
        for w in weights:
            torch.mm(h, w["qkv"].t())
            a = torch.mm(h, w["o"].t())
            gu = torch.mm(a, w["gate_up"].t())
            torch.mm(silu_and_mul(gu), w["down"].t())

    def triton_chain():
        for w in weights:
            gemv(h, w["qkv"])
            a = gemv(h, w["o"])
            gu = gemv(a, w["gate_up"])
            gemv(gu, w["down"], PRO_SILU_MUL)

    out: dict[str, Any] = {"rows": rows, "bytes": nbytes, "limit_ms": nbytes / copy_bw * 1e3}
    for label, fn in (("cublas", cublas), ("triton", triton_chain)):
        ms = graph_ms(fn, replays=10)
        out[label] = {"ms": ms, "of_limit": out["limit_ms"] / ms}
    print("chain", json.dumps(out), flush=True)
    del weights
    torch.cuda.empty_cache()
    return out


def profile_decode(model: str, steps: int = 24, engine_options: str = "") -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from baton.services.engine import LLM
    options = dict(device="cuda", skip_tokenizer_init=True)
    options.update(json.loads(engine_options or "{}"))
    llm = LLM(model=model, **options)
    rng = random.Random(1)
    prompt = [rng.randrange(3, 128000) for _ in range(128)]
    llm.generate([prompt], greedy(32))
    engine = llm.engine
    engine.add_request("p", prompt, greedy(steps + 64))
    for _ in range(20):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    engine.abort("p")
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    by_name: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in kernels:
        by_name[e.name[:90]] += e.time_range.elapsed_us()
        counts[e.name[:90]] += 1
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:20]
    out = {"steps": steps, "span_us_per_step": span / steps, "kernel_us_per_step": busy / steps,
           "kernels_per_step": len(kernels) / steps,
           "top": [(name, round(us / steps, 1), counts[name] // steps) for name, us in top]}
    print(f"profile: {out['span_us_per_step']:.0f} us/step, kernels busy {out['kernel_us_per_step']:.0f} us, "
          f"{out['kernels_per_step']:.0f} kernels/step", flush=True)
    for name, us, n in out["top"]:
        print(f"  {us:8.1f} us  x{n:<4d} {name}", flush=True)
    del llm
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m baton.bench.decode_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="sweep,chain,profile")
    p.add_argument("--model", default="/tmp/m8b")
    p.add_argument("--engine", default="", help="extra EngineConfig options as JSON (profile part)")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "decode_profile.json"))
    args = p.parse_args(argv)
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0)}
    parts = args.parts.split(",")
    if "sweep" in parts or "chain" in parts:
        res["ceil"] = ceilings()
    if "sweep" in parts:
        res["gemv"] = gemv_sweep(res["ceil"]["copy_bytes_per_s"])
        Path(args.json).write_text(json.dumps(res, indent=1))
    if "chain" in parts:
        res["chain"] = [layer_chain(res["ceil"]["copy_bytes_per_s"], rows) for rows in (1, 2, 4)]
        Path(args.json).write_text(json.dumps(res, indent=1))
    if "profile" in parts:
        res["profile"] = profile_decode(args.model, engine_options=args.engine)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
