"""One step on the wire between rank 0 and the other ranks, and the forward every rank runs.

A step goes out in two parts:
- the *message*, host integers written down each child's pipe (`StepMessage.encode`): the op,
  the sizes, every sequence's (query start, query length, prefix length), the block tables and
  the prompt-logprob rows. The pipe has no deadline (an idle engine sends nothing for hours)
  and its end-of-file tells a child that rank 0 is gone;
- the *tensors* (token ids, positions, KV slots, sampled rows), broadcast over the TP group from
  rank 0's device buffers: on CUDA an overlapped step's token ids are still being sampled on the
  GPU, and NCCL orders the broadcast after them without the host waiting.

`run_step` is the model part of `ModelRunner.execute` (forward, prompt-logprob logits, sampled
logits); rank 0 and the followers run it on equal inputs, so their collectives pair up one for one.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional

import torch

from baton.services.engine.attention.base import AttentionBackend, AttentionMetadata, SequenceSlice
from baton.services.engine.runner.model_runner import StepInputs
from baton.services.engine.runner.positions import context_slots
from baton.services.engine.runner.prompt_logprobs import PromptRows

OP_STEP = 1
OP_STOP = 2
HEADER = struct.Struct("<8q")
"""op, tokens, sequences, sampled rows, table entries, all rows sample (0/1), prompt rows, body int64s."""


@dataclass
class StepMessage:
    """The host part of one step (what a follower cannot compute itself)."""

    op: int
    num_tokens: int = 0
    seqs: list[tuple[int, int, int]] = field(default_factory=list)
    """(query_start, query_len, prefix_len) of each sequence."""
    num_sample_rows: int = 0
    all_rows_sample: bool = False
    block_tables: list[list[int]] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        body: list[int] = []
        for seq in self.seqs:
            body.extend(seq)
        body.extend(len(t) for t in self.block_tables)
        for table in self.block_tables:
            body.extend(table)
        body.extend(self.prompt_rows)
        entries = sum(len(t) for t in self.block_tables)
        header = HEADER.pack(self.op, self.num_tokens, len(self.seqs), self.num_sample_rows, entries,
                             int(self.all_rows_sample), len(self.prompt_rows), len(body))
        return header + struct.pack(f"<{len(body)}q", *body)

    @classmethod
    def decode(cls, header: bytes, body: bytes) -> "StepMessage":
        op, tokens, nseq, nsample, _entries, all_rows, nprompt, _ = HEADER.unpack(header)
        values = struct.unpack(f"<{len(body) // 8}q", body)
        seqs = [tuple(values[3 * i:3 * i + 3]) for i in range(nseq)]
        at = 3 * nseq
        lengths = values[at:at + nseq]
        at += nseq
        tables = []
        for n in lengths:
            tables.append(list(values[at:at + n]))
            at += n
        return cls(op, tokens, seqs, nsample, bool(all_rows), tables, list(values[at:at + nprompt]))

    @staticmethod
    def body_bytes(header: bytes) -> int:
        return 8 * HEADER.unpack(header)[7]

    @property
    def tensor_len(self) -> int:
        """int64s of the broadcast tensor: ids, positions, slots, sampled rows."""
        return 3 * self.num_tokens + self.num_sample_rows


def message_of(inputs: StepInputs) -> StepMessage:
    """Rank 0: the host part of a prepared step."""
    meta = inputs.meta
    return StepMessage(OP_STEP, int(inputs.input_ids.shape[0]),
                       [(s.query_start, s.query_len, s.prefix_len) for s in meta.seqs],
                       int(inputs.sample_rows.shape[0]), inputs.all_rows_sample, list(meta.block_tables or []),
                       list(inputs.prompt_rows.rows))


def tensors_of(inputs: StepInputs) -> torch.Tensor:
    """Rank 0: the broadcast tensor of a prepared step (on its device)."""
    return torch.cat([inputs.input_ids, inputs.positions, inputs.meta.slot_mapping, inputs.sample_rows])


def inputs_from(message: StepMessage, tensor: torch.Tensor, page_size: int, sliding_window: Optional[int],
                backend: AttentionBackend) -> StepInputs:
    """A follower: rank 0's step rebuilt from its message and broadcast tensor."""
    n = message.num_tokens
    seqs = [SequenceSlice(query_start=start, query_len=length, prefix_len=prefix)
            for start, length, prefix in message.seqs]
    if backend.uses_context_slots:  # as rank 0's prepare builds them: views of one tensor
        for seq, context in zip(seqs, context_slots(message.block_tables, [s.context_len for s in seqs], page_size,
                                                    tensor.device)):
            seq.context_slots = context
    meta = AttentionMetadata(seqs=seqs, slot_mapping=tensor[2 * n:3 * n], sliding_window=sliding_window,
                             block_tables=message.block_tables, page_size=page_size)
    rows = PromptRows()
    rows.rows = list(message.prompt_rows)
    rows.targets = [0] * len(rows.rows)  # the logits are computed (collectives); the entries are rank 0's
    rows.tops = [0] * len(rows.rows)
    return StepInputs(input_ids=tensor[:n], positions=tensor[n:2 * n], meta=meta,
                      sample_rows=tensor[3 * n:3 * n + message.num_sample_rows],
                      all_rows_sample=message.all_rows_sample, prompt_rows=rows)


def run_step(model, backend: AttentionBackend, inputs: StepInputs) -> torch.Tensor:
    """Forward, prompt-logprob logits and sampled logits of one step: float32 [sampled rows, vocab]."""
    backend.prepare(inputs.meta)
    hidden = model(inputs.input_ids, inputs.positions, backend, inputs.meta)
    if inputs.prompt_rows.rows:
        inputs.prompt_rows.compute(model.compute_logits, hidden)
    if inputs.sample_rows.numel() == 0:
        return hidden.new_empty((0, model.config.vocab_size), dtype=torch.float32)
    if inputs.all_rows_sample:
        return model.compute_logits(hidden).float()
    return model.compute_logits(hidden.index_select(0, inputs.sample_rows)).float()
