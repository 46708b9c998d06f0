"""Row-wise argmax over a vocabulary-wide logits batch, in two short Triton launches (CUDA).

torch's `argmax(dim=-1)` on a [1, 128256] row runs as one long reduction (about 27 us on an
H100, in every batch-1 decode step); here each row is cut into chunks that many programs
reduce in parallel (first kernel: the best value and its first index per chunk), and a
second kernel picks, per row, the first chunk holding the best value. Ties resolve to the
lowest index, as torch's do; a NaN counts as the largest value, as in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096
"""Logits per program of the first kernel."""


@triton.jit
def _chunk_argmax_kernel(X, BestV, BestI, V, stride_x, CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN wins, as in torch
    value, index = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(BestV + row * CHUNKS + chunk, value)
    tl.store(BestI + row * CHUNKS + chunk, chunk * BLOCK + index)


@triton.jit
def _row_argmax_kernel(BestV, BestI, Out, CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < CHUNKS
    values = tl.load(BestV + row * CHUNKS + offs, mask=mask, other=float("-inf"))
    _, best = tl.max(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(Out + row, tl.load(BestI + row * CHUNKS + best).to(tl.int64))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B] int64 index of each row's largest value of `logits` [B, V]; torch's argmax off CUDA."""
    if not logits.is_cuda or logits.dim() != 2 or logits.shape[0] == 0 or logits.stride(1) != 1:
        return logits.argmax(dim=-1)
    rows, vocab = logits.shape
    chunks = triton.cdiv(vocab, CHUNK)
    best_v = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    best_i = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _chunk_argmax_kernel[(rows, chunks)](logits, best_v, best_i, vocab, logits.stride(0), CHUNKS=chunks,
                                         BLOCK=CHUNK, num_warps=8)
    _row_argmax_kernel[(rows,)](best_v, best_i, out, CHUNKS=chunks, BLOCK_C=triton.next_power_of_2(chunks),
                                num_warps=1)
    return out
