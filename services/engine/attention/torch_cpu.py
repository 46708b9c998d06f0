"""Attention with torch (the CPU path): gather each sequence's context from the paged cache
and run scaled-dot-product attention.

Single-token (decode) sequences are attended in one padded batch per layer with a length
mask; multi-token (prefill / extend) sequences one by one with a causal (optionally
sliding-window) mask. Grouped-query attention uses SDPA's `enable_gqa`, so keys and
values are never repeated per query head. An fp8 cache is read through `KVCache.gather`
(float8 storage dequantised into the query's dtype: float32 compute on CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from baton.services.engine.attention.base import AttentionBackend, AttentionMetadata, SequenceSlice
from baton.services.engine.kv.kv_cache import KVCache


class TorchAttentionBackend(AttentionBackend):
    """Reference backend: correct for every page size and GQA ratio; used on CPU."""

    def __init__(self, kv_cache: KVCache, num_heads: int, head_dim: int) -> None:
        self.kv_cache = kv_cache
        self.num_heads = num_heads
        self.scale = head_dim ** -0.5

    def prepare(self, meta: AttentionMetadata) -> None:
        """Split the step into extend sequences and one padded decode batch (shared by all layers)."""
        extends = [s for s in meta.seqs if s.query_len > 1]
        decodes = [s for s in meta.seqs if s.query_len == 1]
        meta.plan = (extends, DecodeBatch(decodes, meta.sliding_window) if decodes else None)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        self.kv_cache.write(layer, meta.slot_mapping, k, v)
        out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
        if meta.plan is None:
            self.prepare(meta)
        extends, decode = meta.plan
        for seq in extends:
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            ctx_k, ctx_v = self.kv_cache.gather(layer, seq.context_slots, q.dtype)
            out[rows] = self._attend(q[rows], ctx_k, ctx_v, causal_mask(seq, meta.sliding_window, q.device))
        if decode is not None:
            out[decode.rows] = decode.attend(q, self.kv_cache, layer, self.scale)
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=self.scale, enable_gqa=True)
        return o.transpose(0, 1).reshape(q.shape[0], -1)


class DecodeBatch:
    """All single-token sequences of a step, padded to the longest context."""

    def __init__(self, seqs: list[SequenceSlice], window: int | None) -> None:
        device = seqs[0].context_slots.device
        longest = max(s.context_len for s in seqs)
        slots = torch.zeros(len(seqs), longest, dtype=torch.long, device=device)
        lengths = torch.tensor([s.context_len for s in seqs], device=device)
        for i, s in enumerate(seqs):
            slots[i, :s.context_len] = s.context_slots
        positions = torch.arange(longest, device=device)[None, :]
        visible = positions < lengths[:, None]
        if window is not None:
            visible &= positions > (lengths[:, None] - 1 - window)
        self.slots = slots.reshape(-1)
        self.shape = (len(seqs), longest)
        self.mask = visible[:, None, None, :]
        self.rows = torch.tensor([s.query_start for s in seqs], device=device)

    def attend(self, q: torch.Tensor, kv_cache: KVCache, layer: int, scale: float) -> torch.Tensor:
        """Attention output [batch, Hq * D] of the decode rows of q over layer `layer` of the cache."""
        batch, longest = self.shape
        k, v = kv_cache.gather(layer, self.slots, q.dtype)
        heads, dim = k.shape[1], k.shape[2]
        k = k.view(batch, longest, heads, dim).transpose(1, 2)
        v = v.view(batch, longest, heads, dim).transpose(1, 2)
        qd = q.index_select(0, self.rows)[:, :, None, :]  # [batch, Hq, 1, D]
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=self.mask, scale=scale, enable_gqa=True)
        return o.reshape(batch, -1)


def causal_mask(seq: SequenceSlice, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [query_len, context_len] mask (True = attend), or None when all keys are visible."""
    if seq.query_len == 1 and (window is None or seq.context_len <= window):
        return None
    q_pos = torch.arange(seq.prefix_len, seq.context_len, device=device)[:, None]
    k_pos = torch.arange(seq.context_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask
