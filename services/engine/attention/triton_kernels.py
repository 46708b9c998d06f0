"""Triton attention kernels over the paged KV cache (the GPU path).

The cache is one flat K and one flat V tensor per layer, [num_slots, kv_heads, head_dim],
slot = block * page_size + offset. Kernels find a sequence's position p through its row of
an int32 block table: slot = table[seq, p // page_size] * page_size + p % page_size, so any
page size works (1 included); the page size is a compile-time constant (a shift and a mask
when it is a power of two).

- `decode_attention`: one query token per sequence. One program per (sequence, KV head,
  split) handles all query heads of that KV head's group, so K/V are read once per group;
  long contexts are split along the sequence (flash-decoding) and a second kernel merges
  the splits through their log-sum-exp. With a single split the first kernel writes the
  output directly.
- `extend_attention`: the new tokens of each sequence attend to its cached prefix plus,
  causally, to each other (their own K/V must already be in the cache). Prefill (prefix
  0), chunked prefill (prefix > 0) and mixed batches alike; work is a flat list of
  (sequence, query block) tiles, so short and long sequences share one launch.

One compiled variant per model serves every step: the integers that change from step to
step (split count, block-table width) are not specialized on (`do_not_specialize`), the
split workspace pads its split axis to a multiple of 16 (`decode_workspace`) so its strides
keep their divisibility, and the reduce kernel's split block is at least 32 wide. What is
left varies with the model, page size and dtype, plus single- or multi-split decode (see
`warmup`, which compiles them all at start-up).

Both accumulate in float32 (online softmax in base 2), take bf16 / fp16 / fp32 inputs,
honour a sliding window (a key is visible when 0 <= q_pos - k_pos < window) and pad head
dims that are not powers of two (80, 96, ...) with masks. Float32 inputs use exact IEEE
dot products (no tf32). Both read an fp8 (float8_e4m3fn) cache with per-KV-head scales
(`k_scale` / `v_scale`, float32 [Hkv]): each K / V tile is converted to the query's dtype,
which is exact, the K scale folds into the softmax scale and the V scale multiplies the
accumulator once at the end, so the dots stay in the query's dtype (`KV_FP8`).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MASKED_MAX = tl.constexpr(-1.0e30)
"""Initial running max: finite, so a row with nothing visible yet never computes -inf - -inf."""


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_split_kernel(
    Q, K, V, BlockTable, SeqLens, QRows, Out, MidO, MidLse, KScale, VScale,
    scale_log2, window, num_splits,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_bt, stride_ot,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    IEEE: tl.constexpr, KV_FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(SeqLens + seq)
    start = tl.maximum(seq_len - window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h
    row = tl.load(QRows + seq).to(tl.int64)
    q = tl.load(Q + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    qk_scale = scale_log2
    if KV_FP8:
        qk_scale = qk_scale * tl.load(KScale + kv_head)

    m_i = tl.full([BLOCK_H], MASKED_MAX, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table = BlockTable + seq.to(tl.int64) * stride_bt
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < hi
        block = tl.load(table + pos // PAGE_SIZE, mask=p_mask, other=0)
        slot = block.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(K + slot[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + slot[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:  # e4m3 -> bf16 / fp16 / fp32 is exact; the scales are applied outside the dots
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(p_mask[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if KV_FP8:
        acc = acc * tl.load(VScale + kv_head)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    if SINGLE_SPLIT:
        out = acc / l_safe[:, None]
        tl.store(Out + row * stride_ot + heads[:, None] * HEAD_DIM + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    else:
        out = acc / l_safe[:, None]
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), float("-inf"))
        base = seq.to(tl.int64) * stride_mb + split * stride_ms
        tl.store(MidO + base + heads[:, None] * stride_mh + offs_d[None, :], out,
                 mask=h_mask[:, None] & d_mask[None, :])
        tl.store(MidLse + seq.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=h_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    MidO, MidLse, QRows, Out, num_splits,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ot,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(MidLse + seq.to(tl.int64) * stride_lb + head * stride_lh + offs_s, mask=s_mask,
                  other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.where(lse > float("-inf"), tl.math.exp2(lse - top), 0.0)
    part = tl.load(MidO + seq.to(tl.int64) * stride_mb + head * stride_mh + offs_s[:, None] * stride_ms
                   + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    row = tl.load(QRows + seq).to(tl.int64)
    tl.store(Out + row * stride_ot + head * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=d_mask)


@triton.jit
def _extend_block(q, K, V, table, n0, hi, q_pos, window, qk_scale, acc, m_i, l_i, kv_head, offs_d, d_mask,
                  stride_kt, stride_kh, stride_vt, stride_vh,
                  PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, KV_FP8: tl.constexpr,
                  MASKED: tl.constexpr):
    """One key block of the extend kernel's online softmax; MASKED: apply the causal / window / length mask."""
    k_pos = n0 + tl.arange(0, BLOCK_N)
    k_mask = k_pos < hi
    block = tl.load(table + k_pos // PAGE_SIZE, mask=k_mask, other=0)
    slot = block.to(tl.int64) * PAGE_SIZE + k_pos % PAGE_SIZE
    kv_mask = k_mask[:, None] & d_mask[None, :]
    k = tl.load(K + slot[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + slot[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    if KV_FP8:  # e4m3 -> bf16 / fp16 / fp32 is exact; the scales are applied outside the dots
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = qk * qk_scale
    if MASKED:
        visible = k_mask[None, :] & (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["stride_bt"])
def _extend_kernel(
    Q, K, V, Out, BlockTable, QStart, QLen, PrefixLen, Tiles, KScale, VScale,
    scale_log2, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, stride_ot,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, KV_FP8: tl.constexpr,
):
    head = tl.program_id(0)
    tile = tl.program_id(1)
    seq = tl.load(Tiles + 2 * tile)
    m_block = tl.load(Tiles + 2 * tile + 1)
    q_start = tl.load(QStart + seq).to(tl.int64)
    q_len = tl.load(QLen + seq)
    prefix = tl.load(PrefixLen + seq)
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_pos = prefix + offs_m
    rows = q_start + offs_m
    q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    qk_scale = scale_log2
    if KV_FP8:
        qk_scale = qk_scale * tl.load(KScale + kv_head)

    # keys up to the tile's last query (causal); with a window, from the first query's reach
    hi = prefix + tl.minimum(q_len, (m_block + 1) * BLOCK_M)
    lo = tl.maximum(prefix + m_block * BLOCK_M - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], MASKED_MAX, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = BlockTable + seq.to(tl.int64) * stride_bt
    # key blocks every query of the tile sees whole (they end at or before the tile's first query, and
    # no window applies) skip the per-element mask; only the blocks on the diagonal (and a window's edge) pay it
    full_end = lo
    if window >= hi:
        full_end = tl.maximum(lo, ((prefix + m_block * BLOCK_M + 1) // BLOCK_N) * BLOCK_N)
    for n0 in range(lo, full_end, BLOCK_N):
        acc, m_i, l_i = _extend_block(q, K, V, table, n0, hi, q_pos, window, qk_scale, acc, m_i, l_i, kv_head,
                                      offs_d, d_mask, stride_kt, stride_kh, stride_vt, stride_vh,
                                      PAGE_SIZE, BLOCK_N, IEEE, KV_FP8, False)
    for n0 in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _extend_block(q, K, V, table, n0, hi, q_pos, window, qk_scale, acc, m_i, l_i, kv_head,
                                      offs_d, d_mask, stride_kt, stride_kh, stride_vt, stride_vh,
                                      PAGE_SIZE, BLOCK_N, IEEE, KV_FP8, True)

    if KV_FP8:
        acc = acc * tl.load(VScale + kv_head)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(Out + rows[:, None] * stride_ot + head * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------- launchers

def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernels compute on: next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def decode_block_n(head_dim: int) -> int:
    """Keys per decode-loop iteration."""
    return 64 if padded_head_dim(head_dim) <= 128 else 32


@functools.lru_cache(maxsize=None)
def _hopper_or_newer() -> bool:
    """Whether the current CUDA device has Hopper's shared memory (228 KB a multiprocessor) or more."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def extend_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the extend kernel. On Hopper, 16-bit heads of 128 take
    128-row tiles and three stages: 18-20% faster than (64, 64, 4, 2) on an H200 (32k last chunk 7.82 ->
    6.43 ms, 8 x (1k prefix + 1k) 1.00 -> 0.86 ms; bench/RESULTS.md "extend kernel")."""
    wide = padded_head_dim(head_dim) > 128
    if wide or dtype == torch.float32:
        return (64, 32, 8 if wide else 4, 2)
    if _hopper_or_newer():
        return (128, 64, 4, 3)
    return (64, 64, 4, 2)


def extend_blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the extend kernel: query rows and keys per tile."""
    return extend_config(head_dim, dtype)[:2]


def num_decode_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int = 132,
                      min_tokens_per_split: int = 128, max_splits: int = 64) -> int:
    """How many pieces to cut each decode sequence into: enough programs to fill the GPU
    (at most four per multiprocessor), each with at least `min_tokens_per_split` keys. Measured on an H200
    (bench/RESULTS.md "decode splits"), 8 KV heads: batch 1 reads fastest with 64 splits (82% of the read
    limit at 32k, 69% with 32), batch 4 with 16, batch 32 with 2 (3 is 29% slower): about 512 programs."""
    programs = max(1, batch * num_kv_heads)
    wanted = (4 * num_sms) // programs
    by_length = max(1, triton.cdiv(max_context, min_tokens_per_split))
    return max(1, min(wanted, by_length, max_splits))


def decode_workspace(batch: int, num_heads: int, num_splits: int, head_dim: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mid_out float32 [batch, Hq, S, D], mid_lse float32 [batch, Hq, S]) for a multi-split decode,
    S = num_splits rounded up to a multiple of 16: the strides the kernels see then have the same
    divisibility whatever the split count, so no split count triggers a new compile."""
    width = 16 * triton.cdiv(max(1, num_splits), 16)
    return (torch.empty(batch, num_heads, width, head_dim, dtype=torch.float32, device=device),
            torch.empty(batch, num_heads, width, dtype=torch.float32, device=device))


NO_WINDOW = 1 << 30
"""The window the kernels get when there is none: longer than any context."""


def _window_arg(sliding_window: int | None) -> int:
    if sliding_window is None or sliding_window <= 0:
        return NO_WINDOW
    return min(int(sliding_window), NO_WINDOW)


def _kv_scales(k_cache: torch.Tensor, k_scale: torch.Tensor | None,
               v_scale: torch.Tensor | None) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(cache is fp8, K scale pointer, V scale pointer); an unscaled cache passes the cache itself
    as a never-read placeholder."""
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if not fp8:
        return False, k_cache, k_cache
    assert k_scale is not None and v_scale is not None, "an fp8 KV cache needs k_scale and v_scale"
    heads = k_cache.shape[1]
    assert k_scale.dtype == v_scale.dtype == torch.float32 and k_scale.numel() == v_scale.numel() == heads
    assert k_scale.is_contiguous() and v_scale.is_contiguous()
    return True, k_scale, v_scale


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, page_size: int, scale: float, *, q_rows: torch.Tensor | None = None,
                     out: torch.Tensor | None = None, sliding_window: int | None = None, num_splits: int = 1,
                     workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Single-token attention of each sequence over its paged context.

    q [T, Hq, D] (rows `q_rows[i]` are sequence i's query; default rows 0..batch-1),
    k_cache / v_cache [slots, Hkv, D], block_table int32 [batch, max_blocks],
    seq_lens int32 [batch] (context length including the query token, whose K/V are
    already in the cache). Writes out[q_rows[i]] ([T, Hq * D], q's dtype) and returns out.
    `workspace` = (mid_out float32 [batch, Hq, >= splits, D], mid_lse float32 [batch, Hq, >= splits],
    as `decode_workspace` makes them) may be passed in to avoid an allocation when num_splits > 1.
    An fp8 (float8_e4m3fn) cache needs `k_scale` / `v_scale` (float32 [Hkv]: stored value * scale = value).
    """
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    batch = block_table.shape[0]
    assert num_heads % num_kv_heads == 0 and k_cache.shape[2] == head_dim
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
    if q_rows is None:
        q_rows = torch.arange(batch, dtype=torch.int32, device=q.device)
    if batch == 0:
        return out
    block_d = padded_head_dim(head_dim)
    block_h = max(16, triton.next_power_of_2(group))
    block_n = decode_block_n(head_dim)
    single = num_splits <= 1
    num_splits = max(1, num_splits)
    if single:
        mid_o = mid_lse = out  # unused
        mid_strides = (0, 0, 0, 0, 0)
    else:
        mid_o, mid_lse = workspace or decode_workspace(batch, num_heads, num_splits, head_dim, q.device)
        mid_strides = (mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1))
    ieee = q.dtype == torch.float32
    fp8, k_scale, v_scale = _kv_scales(k_cache, k_scale, v_scale)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, q_rows, out, mid_o, mid_lse, k_scale, v_scale,
        scale * LOG2E, _window_arg(sliding_window), num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_table.stride(0), out.stride(0), *mid_strides,
        GROUP=group, BLOCK_H=block_h, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE_SIZE=page_size,
        BLOCK_N=block_n, SINGLE_SPLIT=single, IEEE=ieee, KV_FP8=fp8, num_warps=4, num_stages=2,
    )
    if not single:
        _decode_reduce_kernel[(batch, num_heads)](
            mid_o, mid_lse, q_rows, out, num_splits, *mid_strides, out.stride(0),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(32, triton.next_power_of_2(num_splits)), num_warps=4,
        )
    return out


def extend_tiles(query_lens: list[int], block_m: int, prefix_lens: list[int] | None = None) -> list[int]:
    """Flat [seq, block, seq, block, ...] list of the extend kernel's work tiles, the ones
    with the most keys to read first (so the longest programs do not start last)."""
    work = []
    for i, n in enumerate(query_lens):
        prefix = prefix_lens[i] if prefix_lens is not None else 0
        for m in range(math.ceil(n / block_m)):
            work.append((prefix + min(n, (m + 1) * block_m), i, m))
    work.sort(key=lambda t: -t[0])
    tiles: list[int] = []
    for _, i, m in work:
        tiles.extend((i, m))
    return tiles


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     q_start: torch.Tensor, q_lens: torch.Tensor, prefix_lens: torch.Tensor, page_size: int,
                     scale: float, *, tiles: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     sliding_window: int | None = None, max_query_len: int | None = None,
                     config: tuple[int, int, int, int] | None = None,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of each sequence's new tokens over its cached prefix and, causally, each other.

    q [T, Hq, D]; sequence i's new tokens are rows q_start[i] .. q_start[i] + q_lens[i] - 1 at
    positions prefix_lens[i] + j; all their K/V (prefix and new) are already in the cache,
    reached through block_table int32 [batch, max_blocks]. q_start / q_lens / prefix_lens are
    int32 [batch]. `tiles` (int32, from `extend_tiles` with the kernel's BLOCK_M) lists the
    work; without it, it is built from q_lens (a device-to-host copy unless max_query_len
    is given, in which case every sequence gets that many blocks and empty ones do nothing).
    `config` overrides `extend_config` (tiles must then be built with its BLOCK_M). An fp8 cache
    needs `k_scale` / `v_scale` as in `decode_attention`.
    Writes out's rows of those tokens ([T, Hq * D], q's dtype) and returns out.
    """
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    assert num_heads % num_kv_heads == 0 and k_cache.shape[2] == head_dim
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    if out is None:
        out = torch.empty(tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
    block_m, block_n, num_warps, num_stages = config or extend_config(head_dim, q.dtype)
    if tiles is None:
        if max_query_len is None:
            lens = [int(n) for n in q_lens.tolist()]
        else:
            lens = [max_query_len] * q_lens.shape[0]
        tiles = torch.tensor(extend_tiles(lens, block_m), dtype=torch.int32, device=q.device)
    num_tiles = tiles.numel() // 2
    if num_tiles == 0:
        return out
    assert num_tiles < 65536, "too many extend tiles for one launch"
    fp8, k_scale, v_scale = _kv_scales(k_cache, k_scale, v_scale)
    _extend_kernel[(num_heads, num_tiles)](
        q, k_cache, v_cache, out, block_table, q_start, q_lens, prefix_lens, tiles, k_scale, v_scale,
        scale * LOG2E, _window_arg(sliding_window),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_table.stride(0), out.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), PAGE_SIZE=page_size,
        BLOCK_M=block_m, BLOCK_N=block_n, IEEE=q.dtype == torch.float32, KV_FP8=fp8,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
