"""Turns a scheduled step into tensors, runs the model, and returns the logits to sample.

Owns the flattening of a step's sequences into one token batch (input ids, positions, KV
slot of every new token, the context slots of every sequence) and the choice of rows
whose logits are computed (the last token of every request that samples this step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.attention.base import AttentionBackend, AttentionMetadata, SequenceSlice
from services.engine.models.llama import LlamaForCausalLM
from services.engine.scheduler import ScheduledItem


@dataclass
class StepInputs:
    """The flattened batch of one step."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor
    """Index (into the flattened tokens) of the last token of each sampling request."""


class ModelRunner:
    """Runs the model on the KV cache through an attention backend."""

    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, page_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.device = device
        self.sliding_window = model.config.sliding_window

    def prepare(self, items: list[ScheduledItem]) -> StepInputs:
        """Build the step's tensors from the scheduled items."""
        ids: list[int] = []
        positions: list[int] = []
        seqs: list[SequenceSlice] = []
        tables: list[list[int]] = []
        slots: list[torch.Tensor] = []
        sample_rows: list[int] = []
        page = self.page_size
        offsets = torch.arange(page)
        slots_on_device = self.backend.uses_context_slots
        for item in items:
            req = item.request
            end = item.start + item.num_tokens
            ids.extend(req.all_token_ids[item.start:end])
            positions.extend(range(item.start, end))
            blocks = req.block_table[:(end + page - 1) // page]
            tables.append(blocks)
            table = torch.tensor(blocks, dtype=torch.long)
            context = (table[:, None] * page + offsets[None, :]).reshape(-1)[:end]
            seqs.append(SequenceSlice(query_start=len(ids) - item.num_tokens, query_len=item.num_tokens,
                                      prefix_len=item.start,
                                      context_slots=context.to(self.device) if slots_on_device else context))
            slots.append(context[item.start:end])
            if item.samples:
                sample_rows.append(len(ids) - 1)
        meta = AttentionMetadata(seqs=seqs, slot_mapping=torch.cat(slots).to(self.device),
                                 sliding_window=self.sliding_window, block_tables=tables, page_size=page)
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            meta=meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=self.device),
        )

    @torch.inference_mode()
    def execute(self, items: list[ScheduledItem]) -> torch.Tensor:
        """Run one step; returns float32 logits [num sampling requests, vocab]."""
        inputs = self.prepare(items)
        self.backend.prepare(inputs.meta)
        hidden = self.model(inputs.input_ids, inputs.positions, self.backend, inputs.meta)
        if inputs.sample_rows.numel() == 0:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        return self.model.compute_logits(hidden.index_select(0, inputs.sample_rows)).float()
