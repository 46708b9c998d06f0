"""Fused Triton kernels of the GPU decoder path: few launches per layer, same rounding as torch.

A decoder layer on the GPU runs as: RMSNorm (fused with the residual add), one QKV GEMM,
`rope_and_store` (RoPE on q in place, RoPE on k, k and v written into their KV-cache slots,
quantised to fp8 by their per-head scales for an fp8 cache),
attention over the cache, the o GEMM, add + RMSNorm, one gate/up GEMM, `silu_and_mul`, the
down GEMM: nine launches where the plain torch version takes about fifty, which is what
bounds batch-1 decode once CUDA graphs have removed the launch gaps.

Every kernel rounds where torch / Hugging Face round (each bf16 elementwise product, the
sum of the two rotary terms, the normalized value before the weight multiply), so results
match the unfused modules up to float32 reduction order. Rows whose slot is negative (the
padding rows of a CUDA-graph batch) write nothing into the cache.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(X, R, W, Out, ROut, n_cols, eps,
                    stride_x, stride_r, stride_o, stride_ro,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(ROut + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    y = (xf * tl.math.rsqrt(var + eps)).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(Out + row * stride_o + cols, out.to(Out.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual) for x [T, H]; without a residual, (norm(x) * weight, x).

    As Hugging Face's LlamaRMSNorm: the sum is rounded to x's dtype, the variance taken in
    float32, the normalized value rounded to x's dtype before the multiply by the weight."""
    tokens, hidden = x.shape
    out = torch.empty(tokens, hidden, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is None:
        new_residual, r = x, x
    else:
        new_residual = torch.empty_like(x)
        r = residual
    if tokens == 0:
        return out, new_residual
    block = triton.next_power_of_2(hidden)
    _rmsnorm_kernel[(tokens,)](
        x, r, weight, out, new_residual, hidden, eps,
        x.stride(0), r.stride(0), out.stride(0), new_residual.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )
    return out, new_residual


@triton.jit
def _rope_store_kernel(QKV, Cos, Sin, Slots, KCache, VCache, KScale, VScale,
                       stride_t, stride_c, stride_s, stride_ks, stride_kh, stride_vs, stride_vh,
                       NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
                       HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                       ROUND: tl.constexpr, QUANT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < HALF
    row = QKV + t * stride_t
    c1 = tl.load(Cos + t * stride_c + offs, mask=d_mask, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + t * stride_c + HALF + offs, mask=d_mask, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + t * stride_c + offs, mask=d_mask, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + t * stride_c + HALF + offs, mask=d_mask, other=0.0).to(tl.float32)

    # q heads: rotated in place
    hq = tl.arange(0, BLOCK_Q)
    q_mask = (hq < NUM_Q)[:, None] & d_mask[None, :]
    q_ptr = row + hq[:, None] * HEAD_DIM + offs[None, :]
    x1 = tl.load(q_ptr, mask=q_mask, other=0.0)
    x2 = tl.load(q_ptr + HALF, mask=q_mask, other=0.0)
    dt = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if ROUND:
        o1 = ((x1 * c1[None, :]).to(dt).to(tl.float32) + (-x2 * s1[None, :]).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)).to(dt)
    else:
        o1 = (x1 * c1[None, :] - x2 * s1[None, :]).to(dt)
        o2 = (x2 * c2[None, :] + x1 * s2[None, :]).to(dt)
    tl.store(q_ptr, o1, mask=q_mask)
    tl.store(q_ptr + HALF, o2, mask=q_mask)

    slot = tl.load(Slots + t * stride_s).to(tl.int64)
    if slot >= 0:
        hk = tl.arange(0, BLOCK_KV)
        k_mask = (hk < NUM_KV)[:, None] & d_mask[None, :]
        k_ptr = row + NUM_Q * HEAD_DIM + hk[:, None] * HEAD_DIM + offs[None, :]
        y1 = tl.load(k_ptr, mask=k_mask, other=0.0).to(tl.float32)
        y2 = tl.load(k_ptr + HALF, mask=k_mask, other=0.0).to(tl.float32)
        if ROUND:
            k1 = ((y1 * c1[None, :]).to(dt).to(tl.float32) + (-y2 * s1[None, :]).to(dt).to(tl.float32)).to(dt)
            k2 = ((y2 * c2[None, :]).to(dt).to(tl.float32) + (y1 * s2[None, :]).to(dt).to(tl.float32)).to(dt)
        else:
            k1 = (y1 * c1[None, :] - y2 * s1[None, :]).to(dt)
            k2 = (y2 * c2[None, :] + y1 * s2[None, :]).to(dt)
        kc = KCache + slot * stride_ks + hk[:, None] * stride_kh + offs[None, :]
        v_ptr = row + (NUM_Q + NUM_KV) * HEAD_DIM + hk[:, None] * HEAD_DIM + offs[None, :]
        vc = VCache + slot * stride_vs + hk[:, None] * stride_vh + offs[None, :]
        v1 = tl.load(v_ptr, mask=k_mask, other=0.0)
        v2 = tl.load(v_ptr + HALF, mask=k_mask, other=0.0)
        if QUANT:  # fp8: value / scale of its head, saturated at +-448 (as kv.fp8.quantize)
            ks = tl.load(KScale + hk, mask=hk < NUM_KV, other=1.0)[:, None]
            vs = tl.load(VScale + hk, mask=hk < NUM_KV, other=1.0)[:, None]
            k1 = tl.minimum(tl.maximum(k1.to(tl.float32) / ks, -448.0), 448.0)
            k2 = tl.minimum(tl.maximum(k2.to(tl.float32) / ks, -448.0), 448.0)
            v1 = tl.minimum(tl.maximum(v1.to(tl.float32) / vs, -448.0), 448.0)
            v2 = tl.minimum(tl.maximum(v2.to(tl.float32) / vs, -448.0), 448.0)
        tl.store(kc, k1.to(KCache.dtype.element_ty), mask=k_mask)
        tl.store(kc + HALF, k2.to(KCache.dtype.element_ty), mask=k_mask)
        tl.store(vc, v1.to(VCache.dtype.element_ty), mask=k_mask)
        tl.store(vc + HALF, v2.to(VCache.dtype.element_ty), mask=k_mask)


def rope_and_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int,
                   head_dim: int, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE on the q part of qkv [T, (Hq + 2 Hkv) * D] in place; rotated k and v stored at
    `slots` [T] (int32 / int64; negative: not stored) of the flat caches [slots, Hkv, D]
    (float8_e4m3fn caches: divided by `k_scale` / `v_scale`, float32 [Hkv], and saturated).
    cos / sin are [T, D] in qkv's dtype (Hugging Face's cat(freqs, freqs) tables).
    Returns the q view [T, Hq, D] (row stride (Hq + 2 Hkv) * D, unit stride inside a head)."""
    tokens = qkv.shape[0]
    assert qkv.stride(1) == 1 and head_dim % 2 == 0
    assert k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and cos.stride(1) == 1 and sin.stride() == cos.stride()
    q = qkv[:, :num_heads * head_dim].view(tokens, num_heads, head_dim)
    if tokens == 0:
        return q
    half = head_dim // 2
    quant = k_cache.dtype == torch.float8_e4m3fn
    if quant:
        assert k_scale is not None and v_scale is not None and k_scale.numel() == v_scale.numel() == num_kv_heads
        assert k_scale.dtype == v_scale.dtype == torch.float32
    else:
        k_scale = v_scale = k_cache  # placeholders, never read
    _rope_store_kernel[(tokens,)](
        qkv, cos, sin, slots, k_cache, v_cache, k_scale, v_scale,
        qkv.stride(0), cos.stride(0), slots.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        NUM_Q=num_heads, NUM_KV=num_kv_heads, BLOCK_Q=triton.next_power_of_2(num_heads),
        BLOCK_KV=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim, HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half), ROUND=qkv.dtype != torch.float32, QUANT=quant, num_warps=4,
    )
    return q


@triton.jit
def _silu_mul_kernel(X, Out, n_cols, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(X + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    out = act.to(tl.float32) * u.to(tl.float32)
    tl.store(Out + row * stride_o + cols, out.to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :N]) * x[:, N:] for x [T, 2N] (the fused gate/up output), rounded as torch."""
    tokens, width = x.shape
    n = width // 2
    out = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    block = 1024
    _silu_mul_kernel[(tokens, triton.cdiv(n, block))](x, out, n, x.stride(0), out.stride(0), BLOCK=block,
                                                      num_warps=4)
    return out
