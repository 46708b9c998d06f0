"""The KV-cache memory: one key and one value tensor per layer, addressed by slot.

Slot s lives in block s // page_size at offset s % page_size; blocks themselves are
handed out by `BlockPool`. The tensors are flat [num_blocks * page_size, kv_heads,
head_dim] so a block is a contiguous byte range (what the transfer engines move).

An fp8 cache (`layout.dtype` float8_e4m3fn, `kv/fp8.py`) stores K / V divided by a fixed
per-(layer, head) scale: `write` quantises, `gather` dequantises, and the GPU kernels take
`k_scale[layer]` / `v_scale[layer]` (float32 [kv_heads] on the cache's device) to do the same
inside. The scales are part of the layout: fixed at engine start, so a block means the same
in every request and on every worker whose layout compares equal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.services.engine.kv.fp8 import dequantize, is_fp8, quantize


@dataclass(frozen=True)
class KVLayout:
    """Shape of the cache; also what two workers compare before moving blocks."""

    num_layers: int
    """Decoder layers (one K and one V tensor each)."""
    num_blocks: int
    """Blocks in the pool."""
    page_size: int
    """Tokens per block."""
    num_kv_heads: int
    """Key/value heads per token."""
    head_dim: int
    """Width of one head."""
    dtype: torch.dtype
    """Element type (float8_e4m3fn: an fp8 cache with `scales`)."""
    scales: tuple[float, ...] = ()
    """fp8 only: the dequantisation multipliers, layer-major, each layer's K heads then its V heads
    (2 * num_layers * num_kv_heads); empty for an fp8 layout means all 1.0; always empty otherwise."""

    def __post_init__(self) -> None:
        want = 2 * self.num_layers * self.num_kv_heads
        if not is_fp8(self.dtype):
            if self.scales:
                raise ValueError(f"KV scales are for an fp8 cache, not {self.dtype}")
            return
        if not self.scales:
            object.__setattr__(self, "scales", (1.0,) * want)
        scales = tuple(float(s) for s in self.scales)
        if len(scales) != want:
            raise ValueError(f"an fp8 KV layout needs {want} scales (2 x layers x kv heads), got {len(scales)}")
        if not all(s > 0.0 and s < float("inf") for s in scales):
            raise ValueError("KV scales must be positive and finite")
        object.__setattr__(self, "scales", scales)

    @property
    def bytes_per_token(self) -> int:
        """K plus V bytes of one token over all layers (the element size decides: fp8 is half of bf16)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    @property
    def quantized(self) -> bool:
        """True for an fp8 cache (stored values are divided by their scale)."""
        return is_fp8(self.dtype)

    def layer_scales(self, layer: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(K scales, V scales) of one layer, one per KV head (fp8 layouts only)."""
        h = self.num_kv_heads
        base = 2 * h * layer
        return self.scales[base:base + h], self.scales[base + h:base + 2 * h]


def pack_scales(k_scales: list[list[float]], v_scales: list[list[float]]) -> tuple[float, ...]:
    """Per-layer K and V scale lists [layer][head] -> `KVLayout.scales` order."""
    out: list[float] = []
    for k, v in zip(k_scales, v_scales, strict=True):
        out.extend(float(s) for s in k)
        out.extend(float(s) for s in v)
    return tuple(out)


class KVCache:
    """Per-layer key and value storage."""

    def __init__(self, layout: KVLayout, device: torch.device) -> None:
        self.layout = layout
        slots = layout.num_blocks * layout.page_size
        shape = (slots, layout.num_kv_heads, layout.head_dim)
        self.keys = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]
        self.values = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]
        self.k_scale: list[torch.Tensor] | None = None
        """fp8: per layer, the K dequantisation scales float32 [kv_heads] on the device; None otherwise."""
        self.v_scale: list[torch.Tensor] | None = None
        """fp8: per layer, the V scales (as `k_scale`)."""
        self.scales_source = ""
        """Where an fp8 cache's scales came from ("checkpoint" or "calibration", set by the engine setup)."""
        if layout.quantized:
            pairs = [layout.layer_scales(i) for i in range(layout.num_layers)]
            self.k_scale = [torch.tensor(k, dtype=torch.float32, device=device) for k, _ in pairs]
            self.v_scale = [torch.tensor(v, dtype=torch.float32, device=device) for _, v in pairs]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' K/V [T, Hkv, D] at their slots (quantised for an fp8 cache)."""
        if self.k_scale is None:
            self.keys[layer].index_copy_(0, slots, k)
            self.values[layer].index_copy_(0, slots, v)
            return
        # byte views: index_copy_ has no float8 kernel on CPU; the bytes are the values
        kq, vq = quantize(k, self.k_scale[layer]), quantize(v, self.v_scale[layer])
        self.keys[layer].view(torch.uint8).index_copy_(0, slots, kq.view(torch.uint8))
        self.values[layer].view(torch.uint8).index_copy_(0, slots, vq.view(torch.uint8))

    def gather(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [len(slots), Hkv, D] at `slots`, dequantised into `dtype` for an fp8 cache
        (otherwise as stored)."""
        k = self.keys[layer].index_select(0, slots)
        v = self.values[layer].index_select(0, slots)
        if self.k_scale is None:
            return k, v
        return dequantize(k, self.k_scale[layer], dtype), dequantize(v, self.v_scale[layer], dtype)
