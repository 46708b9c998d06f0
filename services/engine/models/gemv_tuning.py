"""Per-GPU choice, at engine start, between cuBLAS and the Triton GEMV for one-token steps.

Which is faster depends on the GPU: on an H100 the Triton GEMV beats cuBLAS on every
Llama-3.1-8B projection, on an H200 cuBLAS wins the wide ones (gate/up, LM head) and Triton
the narrow ones (bench/RESULTS.md). So the fused model measures, once, each projection kind
(qkv, o, gate/up, down with its SiLU, LM head) both ways, with the access pattern of a real
step: one launch per layer over that layer's own weight (so nothing is served from L2),
captured in a CUDA graph, median of a few replays. Each projection module then carries its
choice in `gemv_config`: a Triton tile config, or None for cuBLAS (`gemv.linear` reads it).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from baton.services.engine.models.gemv import PRO_NONE, PRO_SILU_MUL, gemv

CANDIDATES = ((2, 1024, 4, 1), (4, 1024, 4, 1), (8, 512, 4, 3), (8, 1024, 4, 1))
"""Triton tile configs tried against cuBLAS: the best ones of the H100 and H200 sweeps."""


def graph_ms(fn: Callable[[], None], replays: int = 5) -> float:
    """Median GPU time of one replay of `fn` captured in a CUDA graph (no host launch gaps)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _configs(k: int) -> list[tuple[int, int, int, int]]:
    """The candidates, each K tile clipped to the weight's K."""
    widest = max(64, 1 << (k - 1).bit_length())
    configs: list[tuple[int, int, int, int]] = []
    for block_n, block_k, warps, stages in CANDIDATES:
        cfg = (block_n, min(block_k, widest), warps, stages)
        if cfg not in configs:
            configs.append(cfg)
    return configs


def choose(layers: Sequence[nn.Linear], prologue: int = PRO_NONE) -> Optional[tuple[int, int, int, int]]:
    """The fastest way to run one token through every one of `layers` (same shape): a Triton
    config, or None when cuBLAS is fastest."""
    weight = layers[0].weight
    k = weight.shape[1]
    width = 2 * k if prologue == PRO_SILU_MUL else k
    x = torch.randn(1, width, dtype=weight.dtype, device=weight.device) * 0.1

    def cublas() -> None:  # as the model runs it: the down projection's SiLU is a launch of its own
        from baton.services.engine.models.triton_ops import silu_and_mul
        for layer in layers:
            inp = silu_and_mul(x) if prologue == PRO_SILU_MUL else x
            torch.nn.functional.linear(inp, layer.weight, layer.bias)

    best_ms, best = graph_ms(cublas), None
    for cfg in _configs(k):
        def triton(cfg=cfg) -> None:
            for layer in layers:
                gemv(x, layer.weight, prologue, bias=layer.bias, config=cfg)
        ms = graph_ms(triton)
        if ms < best_ms:
            best_ms, best = ms, cfg
    return best


def tune_model(model: nn.Module) -> dict[str, Optional[tuple[int, int, int, int]]]:
    """Set `gemv_config` on every projection of a fused Llama-family model; returns the choices."""
    decoder = model.model.layers
    groups = {
        "qkv": ([layer.self_attn.qkv_proj for layer in decoder], PRO_NONE),
        "o": ([layer.self_attn.o_proj for layer in decoder], PRO_NONE),
        "gate_up": ([layer.mlp.gate_up_proj for layer in decoder], PRO_NONE),
        "down": ([layer.mlp.down_proj for layer in decoder], PRO_SILU_MUL),
        "lm_head": ([model.lm_head], PRO_NONE),
    }
    chosen = {}
    with torch.inference_mode():
        for name, (layers, prologue) in groups.items():
            chosen[name] = choose(layers, prologue)
            for layer in layers:
                layer.gemv_config = chosen[name]
    torch.cuda.synchronize()
    return chosen
