"""FP8 KV-cache scales, decided once at engine start (`--kv-cache-dtype fp8_e4m3`).

Where they come from, first that applies:
1. the checkpoint: `model.layers.N.self_attn.k_scale` / `v_scale` tensors (vLLM's names; an older
   single `kv_scale` serves both), a scalar per layer or one value per KV head, used as they are;
2. a calibration forward: one prefill of `calibration_tokens` (a fixed English paragraph
   through the model's tokenizer, then fixed pseudo-random ids over the vocabulary) on a
   throw-away cache in the model's dtype; per (layer, K or V, KV head) the scale is
   amax * 2 / 448 rounded up to a power of two (`kv.fp8.scale_from_amax`), as vLLM's
   `calculate_kv_scales` (amax / constant) but per head and fixed afterwards.
A scale of 1.0 everywhere (vLLM's default without checkpoint scales) is not used: on small
random-weight models K and V sit around 0.1-1, where e4m3 has 3 mantissa bits at any scale, but
tiny components fall into its subnormals; calibration keeps the amax near the top of the range.

The scales go into the `KVLayout` (fixed for the engine's life: a block keeps its meaning
across requests and workers); the same model calibrated by the same code gives the same
powers of two on every worker, and workers whose scales differ refuse to move blocks.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open

from baton.services.engine.kv.fp8 import scale_from_amax
from baton.services.engine.kv.kv_cache import KVCache, KVLayout, pack_scales

CALIBRATION_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; "
    "Neil Armstrong said: \"That's one small step for man, one giant leap for mankind.\" "
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    "Question: what is 12 * 7? Answer: 84. Les élèves lisent des livres. 東京は日本の首都です。"
)
"""Prose, code, numbers and a few scripts: the calibration prompt's natural-text part."""
CALIBRATION_RANDOM_TOKENS = 192
"""Pseudo-random token ids appended after the text (what random-weight models see in tests)."""

_SCALE_NAME = re.compile(r"layers\.(\d+)\.self_attn\.(k_scale|v_scale|kv_scale)$")


def checkpoint_kv_scales(folder: Path, num_layers: int, num_kv_heads: int) -> Optional[tuple[float, ...]]:
    """The checkpoint's K / V scales in `KVLayout.scales` order, or None when it has none.

    ValueError when only some layers have them or a tensor has an unusable shape."""
    from baton.services.engine.models.loader import weight_files
    found: dict[tuple[int, str], torch.Tensor] = {}
    for path in weight_files(Path(folder)):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                match = _SCALE_NAME.search(name)
                if match:
                    found[(int(match.group(1)), match.group(2))] = f.get_tensor(name).to(torch.float32).reshape(-1)
    if not found:
        return None

    def per_head(layer: int, kind: str) -> list[float]:
        tensor = found.get((layer, kind), found.get((layer, "kv_scale")))
        if tensor is None:
            raise ValueError(f"the checkpoint has KV scales for some layers but no {kind} for layer {layer}")
        if tensor.numel() == 1:
            return [float(tensor)] * num_kv_heads
        if tensor.numel() != num_kv_heads:
            raise ValueError(f"layer {layer} {kind} has {tensor.numel()} values: expected 1 or {num_kv_heads}")
        return [float(x) for x in tensor]

    return pack_scales([per_head(i, "k_scale") for i in range(num_layers)],
                       [per_head(i, "v_scale") for i in range(num_layers)])


def calibration_tokens(tokenizer, vocab_size: int, max_tokens: int) -> list[int]:
    """The calibration prompt: CALIBRATION_TEXT's tokens (none without a tokenizer), then fixed
    pseudo-random ids; at most `max_tokens` tokens."""
    ids: list[int] = []
    if tokenizer is not None:
        ids = [int(t) for t in tokenizer.encode(CALIBRATION_TEXT) if 0 <= int(t) < vocab_size]
    ids += [(7919 * i + 104729) % vocab_size for i in range(CALIBRATION_RANDOM_TOKENS)]
    return ids[:max(1, max_tokens)]


@torch.inference_mode()
def calibrate_kv_scales(model, device: torch.device, dtype: torch.dtype, page_size: int, tokens: list[int],
                        make_backend: Callable[[KVCache], object]) -> tuple[float, ...]:
    """Per-(layer, K/V, head) power-of-two scales from one prefill of `tokens` on a throw-away
    cache in `dtype` (the values the model would store), in `KVLayout.scales` order."""
    from baton.services.engine.request import Request
    from baton.services.engine.runner.model_runner import ModelRunner
    from baton.services.engine.sampling_params import SamplingParams
    from baton.services.engine.scheduling.scheduler import ScheduledItem
    cfg = model.config
    n = len(tokens)
    blocks = list(range(-(-n // page_size)))
    cache = KVCache(KVLayout(cfg.num_layers, len(blocks), page_size, cfg.num_kv_heads, cfg.head_dim, dtype), device)
    runner = ModelRunner(model, make_backend(cache), page_size, device, max_rows=1)
    request = Request(request_id="kv-calibration", parent_id="kv-calibration", index=0, prompt_token_ids=list(tokens),
                      params=SamplingParams(max_tokens=1), arrival=0, block_table=blocks)
    runner.execute([ScheduledItem(request, 0, n)])

    def scales(tensors: list[torch.Tensor]) -> list[list[float]]:
        amax = torch.stack([t[:n].abs().float().amax(dim=(0, 2)) for t in tensors]).cpu()  # [layers, heads]
        return [[scale_from_amax(float(a)) for a in row] for row in amax]

    return pack_scales(scales(cache.keys), scales(cache.values))


def resolve_kv_scales(folder: Path, model, tokenizer, device: torch.device, dtype: torch.dtype, page_size: int,
                      max_model_len: int, make_backend: Callable[[KVCache], object]) -> tuple[tuple[float, ...], str]:
    """(scales, where they came from: "checkpoint" or "calibration") for an fp8 cache."""
    cfg = model.config
    scales = checkpoint_kv_scales(folder, cfg.num_layers, cfg.num_kv_heads)
    if scales is not None:
        return scales, "checkpoint"
    tokens = calibration_tokens(tokenizer, cfg.vocab_size, max_model_len - 1)
    return calibrate_kv_scales(model, device, dtype, page_size, tokens, make_backend), "calibration"
