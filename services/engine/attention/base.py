"""The attention-backend interface over the paged KV cache.

A backend owns two things for every layer: writing the step's new keys/values into their
KV-cache slots, and computing attention of the step's queries over each sequence's whole
context (cached prefix + new tokens, causal among the new ones). The model calls
`backend.forward(layer, q, k, v, meta)` and never sees pages. The CPU backend (torch) and
the GPU backend (Triton kernels) implement the same contract.

Invariants a backend may rely on (the model runner guarantees them):
- tokens of one sequence are contiguous in q/k/v, in position order, sequences in the
  order of `meta.seqs`;
- `meta.slot_mapping[t]` is the KV slot of token t (block * page_size + offset);
- every slot of a sequence's context below its `prefix_len` already holds that position's K/V.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class SequenceSlice:
    """One sequence's part of a batched step."""

    query_start: int
    """Index of the sequence's first new token in the flattened batch."""
    query_len: int
    """New tokens of this sequence in this step."""
    prefix_len: int
    """Tokens whose K/V were in the cache before this step."""
    context_slots: torch.Tensor | None = None
    """KV slot of every context position 0..prefix_len+query_len-1 (long) on the model's
    device; None for a backend whose `uses_context_slots` is False (it reads block tables)."""

    @property
    def context_len(self) -> int:
        """Prefix plus new tokens."""
        return self.prefix_len + self.query_len


@dataclass
class AttentionMetadata:
    """What a backend needs to know about one step's batch (shared by all layers)."""

    seqs: list[SequenceSlice]
    """The sequences of the step, in token order."""
    slot_mapping: torch.Tensor
    """KV slot of every new token [num_tokens] (long)."""
    sliding_window: int | None = None
    """Attend only to keys within this many positions (inclusive of self); None: all."""
    plan: Any = None
    """Backend-private per-step state built by `AttentionBackend.prepare` and shared by all layers."""
    block_tables: list[list[int]] | None = None
    """Per sequence (order of `seqs`), the KV blocks holding its context positions 0.. in order
    (at least ceil(context_len / page_size) of them); None when the builder did not provide them."""
    page_size: int | None = None
    """Tokens per KV block (what `block_tables` count in); None when not provided."""


class AttentionBackend(ABC):
    """Writes new K/V into the paged cache and attends over each sequence's context."""

    uses_context_slots: bool = True
    """False: the backend reads `meta.block_tables` instead, so the model runner leaves each
    `SequenceSlice.context_slots` unset (no per-sequence tensors on the hot path)."""

    def prepare(self, meta: AttentionMetadata) -> None:
        """Called once per step before the first layer; may fill `meta.plan`."""

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] of the new tokens -> attention output [T, Hq * D]."""

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As `forward`, with the step's new K/V already stored in the cache by the caller
        (the fused GPU decoder stores them together with RoPE); written into `out` [T, Hq * D]
        when given. Optional for a backend."""
        raise NotImplementedError(f"{type(self).__name__} cannot attend over K/V stored by the model")
