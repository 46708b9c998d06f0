"""Attention with Triton kernels over the paged KV cache (the GPU path).

`prepare` turns the step's sequences into the kernels' int32 tensors once per step (one
packed host buffer, one host-to-device copy) and every layer reuses them:
- single-token sequences go to the split-K decode kernel (all query heads of a KV group in
  one program, sequences cut into splits when there are too few of them to fill the GPU);
- multi-token sequences (prefill, chunked prefill) go to the extend kernel, which reads
  the cached prefix and the step's own tokens through the block table.
A mixed step launches both, each writing its own rows of the output. New K/V are stored
into the cache first (`KVCache.write`), so the kernels read every key from the cache.
An fp8 cache hands the kernels its per-layer scale tensors (fixed at start, so CUDA graphs
capture them like any other static buffer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from baton.services.engine.attention.base import AttentionBackend, AttentionMetadata, SequenceSlice
from baton.services.engine.attention.triton_kernels import (decode_attention, decode_workspace, extend_attention,
                                                            extend_blocks, extend_tiles, num_decode_splits)
from baton.services.engine.kv.kv_cache import KVCache
from baton.services.engine.host_copy import to_device_async


@dataclass
class DecodePlan:
    """The single-token sequences of a step."""

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    rows: torch.Tensor
    num_splits: int
    workspace: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class ExtendPlan:
    """The multi-token sequences of a step."""

    block_table: torch.Tensor
    q_start: torch.Tensor
    q_lens: torch.Tensor
    prefix_lens: torch.Tensor
    tiles: torch.Tensor


@dataclass
class TritonPlan:
    """Per-step state shared by all layers."""

    decode: DecodePlan | None
    extend: ExtendPlan | None


class TritonAttentionBackend(AttentionBackend):
    """Paged attention on CUDA through the kernels of `triton_kernels`."""

    uses_context_slots = False

    def __init__(self, kv_cache: KVCache, num_heads: int, head_dim: int) -> None:
        self.kv_cache = kv_cache
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = kv_cache.layout.num_kv_heads
        self.page_size = kv_cache.layout.page_size
        self.scale = head_dim ** -0.5
        self.device = kv_cache.keys[0].device
        compute = torch.bfloat16 if kv_cache.quantized else kv_cache.layout.dtype  # fp8: bf16 / fp16 queries
        self.block_m = extend_blocks(head_dim, compute)[0]
        if self.device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        else:  # the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors
            self.num_sms = 1

    def prepare(self, meta: AttentionMetadata) -> None:
        """Build the kernels' index tensors for this step (one host-to-device copy)."""
        tables = meta.block_tables
        if tables is None:
            tables = [self._blocks_of(seq) for seq in meta.seqs]
        decodes = [i for i, s in enumerate(meta.seqs) if s.query_len == 1]
        extends = [i for i, s in enumerate(meta.seqs) if s.query_len > 1]
        packed: list[int] = []
        layout: list[tuple[str, int, int, tuple[int, ...]]] = []

        def add(name: str, values: list[int], shape: tuple[int, ...]) -> None:
            packed.extend([0] * (-len(packed) % 4))  # 16-byte aligned views: one compiled variant
            layout.append((name, len(packed), len(values), shape))
            packed.extend(values)

        if decodes:
            width = max(1, max(len(tables[i]) for i in decodes))
            add("d_table", padded_rows([tables[i] for i in decodes], width), (len(decodes), width))
            add("d_lens", [meta.seqs[i].context_len for i in decodes], (len(decodes),))
            add("d_rows", [meta.seqs[i].query_start for i in decodes], (len(decodes),))
        if extends:
            width = max(1, max(len(tables[i]) for i in extends))
            add("e_table", padded_rows([tables[i] for i in extends], width), (len(extends), width))
            add("e_start", [meta.seqs[i].query_start for i in extends], (len(extends),))
            add("e_lens", [meta.seqs[i].query_len for i in extends], (len(extends),))
            add("e_prefix", [meta.seqs[i].prefix_len for i in extends], (len(extends),))
            add("e_tiles", extend_tiles([meta.seqs[i].query_len for i in extends], self.block_m,
                                        [meta.seqs[i].prefix_len for i in extends]), (-1,))
        host = torch.from_numpy(np.fromiter(packed, dtype=np.int32, count=len(packed)))  # faster than torch.tensor
        if self.device.type == "cuda":
            device_buf = to_device_async(host, self.device)
        else:
            device_buf = host
        views: dict[str, torch.Tensor] = {}
        for name, start, count, shape in layout:
            views[name] = device_buf[start:start + count].view(shape)

        decode = None
        if decodes:
            longest = max(meta.seqs[i].context_len for i in decodes)
            if meta.sliding_window:
                longest = min(longest, meta.sliding_window)
            splits = num_decode_splits(len(decodes), self.num_kv_heads, longest, self.num_sms)
            workspace = None
            if splits > 1:
                workspace = decode_workspace(len(decodes), self.num_heads, splits, self.head_dim, self.device)
            decode = DecodePlan(views["d_table"], views["d_lens"], views["d_rows"], splits, workspace)
        extend = None
        if extends:
            extend = ExtendPlan(views["e_table"], views["e_start"], views["e_lens"], views["e_prefix"],
                                views["e_tiles"])
        meta.plan = TritonPlan(decode=decode, extend=extend)

    def graph_decode_plan(self, block_table: torch.Tensor, seq_lens: torch.Tensor, rows: torch.Tensor,
                          num_splits: int) -> TritonPlan:
        """A decode-only plan over static tensors (a CUDA graph's inputs): a fixed split count
        and its own static workspace, so the captured launches never change shape."""
        batch = block_table.shape[0]
        workspace = None
        if num_splits > 1:
            workspace = decode_workspace(batch, self.num_heads, num_splits, self.head_dim, self.device)
        return TritonPlan(decode=DecodePlan(block_table, seq_lens, rows, num_splits, workspace), extend=None)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        self.kv_cache.write(layer, meta.slot_mapping, k, v)
        return self.attend(layer, q, meta)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention over the cache, which already holds the step's new K/V."""
        if not isinstance(meta.plan, TritonPlan):
            self.prepare(meta)
        plan: TritonPlan = meta.plan
        if q.stride(2) != 1:
            q = q.contiguous()
        cache = self.kv_cache
        keys, values = cache.keys[layer], cache.values[layer]
        k_scale = cache.k_scale[layer] if cache.k_scale is not None else None
        v_scale = cache.v_scale[layer] if cache.v_scale is not None else None
        if out is None:
            out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
        if plan.extend is not None:
            e = plan.extend
            extend_attention(q, keys, values, e.block_table, e.q_start, e.q_lens, e.prefix_lens, self.page_size,
                             self.scale, tiles=e.tiles, out=out, sliding_window=meta.sliding_window,
                             k_scale=k_scale, v_scale=v_scale)
        if plan.decode is not None:
            d = plan.decode
            decode_attention(q, keys, values, d.block_table, d.seq_lens, self.page_size, self.scale,
                             q_rows=d.rows, out=out, sliding_window=meta.sliding_window,
                             num_splits=d.num_splits, workspace=d.workspace, k_scale=k_scale, v_scale=v_scale)
        return out

    def _blocks_of(self, seq: SequenceSlice) -> list[int]:
        """Fallback when the metadata carries no block tables: read them off the context slots."""
        return (seq.context_slots[::self.page_size] // self.page_size).tolist()


def padded_rows(rows: list[list[int]], width: int) -> list[int]:
    """Rows flattened, each padded with block 0 to `width` (padding is never read)."""
    flat: list[int] = []
    for row in rows:
        flat.extend(row)
        flat.extend([0] * (width - len(row)))
    return flat

