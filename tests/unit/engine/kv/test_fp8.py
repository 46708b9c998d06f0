"""The fp8 KV cache's numerics and storage on CPU: the quantise / dequantise round trip within
its stated bound, power-of-two scales, saturation, the layout (scales, half the bytes), the
cache's write / gather, checkpoint scales, and the config flag."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from baton.services.engine.config import EngineConfig
from baton.services.engine.kv.fp8 import (FP8_DTYPE, FP8_MAX, dequantize, kv_storage_dtype, quantize,
                                          round_trip_bound, scale_from_amax)
from baton.services.engine.kv.kv_cache import KVCache, KVLayout, pack_scales
from baton.services.engine.kv_scales import calibration_tokens, checkpoint_kv_scales


def heads_at_magnitudes(tokens: int = 512, dim: int = 64) -> torch.Tensor:
    """[tokens, 4, dim] with heads spread 1e-3, 1, 30 and 2000 (small, unit, large, beyond 448)."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-3, 1.0, 30.0, 2000.0])[None, :, None]
    return torch.randn(tokens, 4, dim, generator=gen) * scales


def test_round_trip_within_the_stated_bound():
    x = heads_at_magnitudes()
    amax = x.abs().amax(dim=(0, 2))
    scale = torch.tensor([scale_from_amax(float(a)) for a in amax])
    back = dequantize(quantize(x, scale), scale, torch.float32)
    err = (back - x).abs()
    # elementwise: half an e4m3 step (2^-4 of |x|) for normals, half a subnormal step below
    bound = torch.maximum(x.abs() * 2.0 ** -4, scale[None, :, None] * 2.0 ** -10)
    assert (err <= bound).all()
    for h in range(4):
        assert err[:, h].max() <= round_trip_bound(float(amax[h]), float(scale[h]))
        rel_rms = (err[:, h].norm() / x[:, h].norm()).item()
        assert rel_rms < 0.04  # measured 0.024-0.027 for Gaussian data: 3 mantissa bits


def test_scales_are_powers_of_two_with_headroom():
    for amax in (1e-4, 0.3, 1.0, 7.0, 448.0, 1e5):
        s = scale_from_amax(amax)
        assert math.log2(s) == int(math.log2(s))
        assert amax / s <= FP8_MAX / 2 and amax / s > FP8_MAX / 4  # the amax lands in (112, 224]
    assert scale_from_amax(0.0) == 1.0
    with pytest.raises(ValueError):
        scale_from_amax(float("nan"))


def test_values_beyond_the_range_saturate():
    scale = torch.tensor([0.5])
    x = torch.tensor([[[1e6, -1e6, 224.0, 0.0]]])
    back = dequantize(quantize(x, scale), scale, torch.float32)
    assert back.tolist() == [[[224.0, -224.0, 224.0, 0.0]]]


def test_layout_counts_half_the_bytes_and_carries_scales():
    bf16 = KVLayout(3, 8, 4, 2, 16, torch.bfloat16)
    fp8 = KVLayout(3, 8, 4, 2, 16, FP8_DTYPE)
    assert fp8.bytes_per_token * 2 == bf16.bytes_per_token
    assert fp8.scales == (1.0,) * 12 and bf16.scales == ()
    scales = pack_scales([[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 10], [11, 12]])
    layout = KVLayout(3, 8, 4, 2, 16, FP8_DTYPE, scales)
    assert layout.layer_scales(1) == ((3.0, 4.0), (9.0, 10.0))
    with pytest.raises(ValueError, match="12 scales"):
        KVLayout(3, 8, 4, 2, 16, FP8_DTYPE, (1.0,) * 5)
    with pytest.raises(ValueError, match="fp8"):
        KVLayout(3, 8, 4, 2, 16, torch.float32, scales)
    with pytest.raises(ValueError, match="positive"):
        KVLayout(1, 8, 4, 1, 16, FP8_DTYPE, (1.0, 0.0))


def test_cache_stores_fp8_and_gathers_dequantised():
    layout = KVLayout(2, 6, 4, 2, 8, FP8_DTYPE, pack_scales([[0.5, 0.25], [1, 2]], [[0.125, 4], [1, 1]]))
    cache = KVCache(layout, torch.device("cpu"))
    assert cache.keys[0].dtype == FP8_DTYPE and cache.k_scale[1].tolist() == [1.0, 2.0]
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(5, 2, 8, generator=gen) * 10, torch.randn(5, 2, 8, generator=gen)
    slots = torch.tensor([3, 0, 17, 9, 22])
    cache.write(0, slots, k, v)
    got_k, got_v = cache.gather(0, slots, torch.float32)
    assert torch.equal(got_k, dequantize(quantize(k, cache.k_scale[0]), cache.k_scale[0], torch.float32))
    assert torch.equal(got_v, dequantize(quantize(v, cache.v_scale[0]), cache.v_scale[0], torch.float32))
    assert (cache.keys[0].view(torch.uint8)[[1, 2, 4]] == 0).all()  # untouched slots
    assert cache.gather(1, slots, torch.float32)[0].abs().sum() == 0


def test_kv_cache_dtype_flag():
    assert EngineConfig(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8_e4m3"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8_e5m2")
    assert kv_storage_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert kv_storage_dtype("fp8_e4m3", torch.float32) is FP8_DTYPE
    import argparse
    from baton.services.common.dataclass_flags import add_flags
    parser = argparse.ArgumentParser()
    add_flags(parser, EngineConfig)
    assert "fp8_e4m3" in parser.format_help()
    assert parser.parse_args(["--kv-cache-dtype", "fp8_e4m3"]).kv_cache_dtype == "fp8_e4m3"


def test_checkpoint_scales(tmp_path):
    save_file({"model.layers.0.self_attn.k_scale": torch.tensor(0.5),
               "model.layers.0.self_attn.v_scale": torch.tensor([0.25, 0.125]),
               "model.layers.1.self_attn.kv_scale": torch.tensor(2.0),
               "model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    assert checkpoint_kv_scales(tmp_path, 2, 2) == (0.5, 0.5, 0.25, 0.125, 2.0, 2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="layer 2"):
        checkpoint_kv_scales(tmp_path, 3, 2)
    empty = tmp_path / "none"
    empty.mkdir()
    save_file({"model.norm.weight": torch.ones(2)}, str(empty / "model.safetensors"))
    assert checkpoint_kv_scales(empty, 2, 2) is None


def test_calibration_prompt_is_fixed_and_in_vocabulary():
    a = calibration_tokens(None, 100, 64)
    assert a == calibration_tokens(None, 100, 64) and len(a) == 64 and all(0 <= t < 100 for t in a)
