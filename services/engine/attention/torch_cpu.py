"""Attention on CPU with torch: gather each sequence's context from the paged cache and
run scaled-dot-product attention with a causal (optionally sliding-window) mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine.attention.base import AttentionBackend, AttentionMetadata, SequenceSlice
from services.engine.kv_cache import KVCache


class TorchAttentionBackend(AttentionBackend):
    """Reference backend: correct for every page size and GQA ratio; used on CPU."""

    def __init__(self, kv_cache: KVCache, num_heads: int, head_dim: int) -> None:
        self.kv_cache = kv_cache
        self.num_heads = num_heads
        self.scale = head_dim ** -0.5

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        self.kv_cache.write(layer, meta.slot_mapping, k, v)
        keys, values = self.kv_cache.keys[layer], self.kv_cache.values[layer]
        out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
        for seq in meta.seqs:
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            ctx_k = keys.index_select(0, seq.context_slots)
            ctx_v = values.index_select(0, seq.context_slots)
            out[rows] = self._attend(q[rows], ctx_k, ctx_v, seq, meta.sliding_window)
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: SequenceSlice,
                window: int | None) -> torch.Tensor:
        group = self.num_heads // k.shape[1]
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        mask = causal_mask(seq, window, q.device)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=self.scale)
        return o.transpose(0, 1).reshape(q.shape[0], -1)


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
