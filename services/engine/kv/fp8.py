"""FP8 (e4m3) KV-cache numerics: the element type, quantise / dequantise, and scales from amax.

An fp8 cache stores x_fp8 = saturate(x / scale) in torch.float8_e4m3fn and reads x = x_fp8 *
scale, with one float32 scale per (layer, K or V, KV head): vLLM's `k_scale` / `v_scale`
convention (the scale is the dequantisation multiplier), per head rather than per tensor.

Scales computed here (`scale_from_amax`) are powers of two: for a floating-point format the
relative precision does not depend on where the values sit in its range, so rounding the
scale up to a power of two costs nothing but a factor < 2 of headroom, makes x / scale exact
(no double rounding) and keeps two workers that calibrated the same model on slightly
different arithmetic on the same scales (their layouts compare them, see `KVLayout.scales`).
"""
from __future__ import annotations

import math
import torch

FP8_DTYPE = torch.float8_e4m3fn
"""The element type of an fp8 KV cache."""
FP8_MAX = 448.0
"""Largest finite float8_e4m3fn magnitude; quantised values saturate there."""
CALIBRATION_MARGIN = 2.0
"""Headroom of calibrated scales: the calibration amax maps to FP8_MAX / margin or below (112..224
once the scale is rounded up to a power of two), so later values up to 2-4x larger still fit."""

KV_CACHE_DTYPES = ("auto", "fp8_e4m3")


def is_fp8(dtype: torch.dtype) -> bool:
    """True for the fp8 KV-cache element type."""
    return dtype == FP8_DTYPE


def kv_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for --kv-cache-dtype: auto keeps the model's activation dtype."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype == "fp8_e4m3":
        return FP8_DTYPE
    raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., H, D] -> float8_e4m3fn of x / scale, saturated at +-FP8_MAX (scale [H], float32)."""
    y = x.to(torch.float32) / scale.to(torch.float32)[:, None]
    return y.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8 x [..., H, D] -> x * scale in `dtype` (computed in float32)."""
    return (x.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def scale_from_amax(amax: float, margin: float = CALIBRATION_MARGIN) -> float:
    """The power of two at or above amax * margin / FP8_MAX (1.0 for an all-zero input)."""
    if not math.isfinite(amax) or amax < 0:
        raise ValueError(f"cannot derive an fp8 scale from amax {amax}")
    if amax == 0.0:
        return 1.0
    return float(2.0 ** math.ceil(math.log2(amax * margin / FP8_MAX)))


def round_trip_bound(amax: float, scale: float) -> float:
    """Largest |x - dequantize(quantize(x))| for |x| <= amax that does not saturate: half an e4m3
    step at the top binade (2^-4 relative), or half the subnormal step (2^-10 * scale) below."""
    return max(amax * 2.0 ** -4, scale * 2.0 ** -10)
