"""Turns a scheduled step into tensors, runs the model, and returns the logits to sample.

Owns the flattening of a step's sequences into one token batch (input ids, positions, KV
slot of every new token, the block table of every sequence, their context slots only for
a backend that reads them) and the choice of rows whose logits are computed (the last
token of every request that samples this step).

Host work per step is plain Python over ints: no per-sequence tensors and no device-to-host
copy; the step's integers travel in one pinned buffer and one asynchronous copy.

CUDA graphs (GPU, fused model, Triton backend): decode-only steps of up to the largest
captured batch size replay a graph captured for the next captured size up. Each graph
reads static input buffers (token ids, positions, slot mapping, sequence lengths, block
tables: one pinned host mirror, one copy per step) and uses a fixed decode split count with
its own workspace; padding rows store nothing (slot -1) and attend to one key. The logits
of every graph land in one shared static buffer; sampling stays outside the graph.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from services.engine.attention.base import AttentionBackend, AttentionMetadata, SequenceSlice
from services.engine.models.llama import LlamaForCausalLM
from services.engine.request import Request
from services.engine.scheduler import ScheduledItem


@dataclass
class StepInputs:
    """The flattened batch of one step."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor
    """Index (into the flattened tokens) of the last token of each sampling request."""
    all_rows_sample: bool = False
    """True when every token samples (a decode-only step): logits need no row selection."""


def token_slice(request: Request, start: int, end: int) -> list[int]:
    """request.all_token_ids[start:end] without building the whole list."""
    prompt = request.prompt_token_ids
    p = len(prompt)
    if end <= p:
        return prompt[start:end]
    output = request.output_token_ids
    if start >= p:
        return output[start - p:end - p]
    return prompt[start:] + output[:end - p]


def token_at(request: Request, position: int) -> int:
    """request.all_token_ids[position]."""
    prompt = request.prompt_token_ids
    p = len(prompt)
    return prompt[position] if position < p else request.output_token_ids[position - p]


def slot_range(table: Sequence[int], start: int, end: int, page: int) -> list[int]:
    """KV slots of positions start..end-1 through a block table."""
    slots: list[int] = []
    pos = start
    while pos < end:
        offset = pos % page
        count = min(page - offset, end - pos)
        base = table[pos // page] * page + offset
        slots.extend(range(base, base + count))
        pos += count
    return slots


class ModelRunner:
    """Runs the model on the KV cache through an attention backend."""

    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, page_size: int,
                 device: torch.device, max_model_len: Optional[int] = None,
                 cuda_graph_bs: Sequence[int] = ()) -> None:
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.device = device
        self.sliding_window = model.config.sliding_window
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.timing: Optional[list[tuple[torch.cuda.Event, torch.cuda.Event]]] = None
        """When a list (CUDA only): each execute appends (start, end) events around its device work."""
        self.graph_bs: list[int] = []
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.use_graphs = False
        """Replay captured graphs for decode-only steps (set by `capture_cuda_graphs`)."""
        if cuda_graph_bs and self.graphs_supported():
            self.capture_cuda_graphs(cuda_graph_bs)

    # --- eager steps -----------------------------------------------------------------
    def prepare(self, items: list[ScheduledItem]) -> StepInputs:
        """Build the step's tensors from the scheduled items."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seqs: list[SequenceSlice] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        page = self.page_size
        want_context = self.backend.uses_context_slots
        for item in items:
            req = item.request
            start, n = item.start, item.num_tokens
            end = start + n
            table = req.block_table
            first = len(ids)
            if n == 1:
                ids.append(token_at(req, start))
                positions.append(start)
                slots.append(table[start // page] * page + start % page)
            else:
                ids.extend(token_slice(req, start, end))
                positions.extend(range(start, end))
                slots.extend(slot_range(table, start, end, page))
            blocks = table[:(end + page - 1) // page]
            tables.append(blocks)
            context = None
            if want_context:
                offsets = torch.arange(page)
                context = (torch.tensor(blocks, dtype=torch.long)[:, None] * page + offsets[None, :]).reshape(-1)
                context = context[:end].to(self.device)
            seqs.append(SequenceSlice(query_start=first, query_len=n, prefix_len=start, context_slots=context))
            if item.samples:
                sample_rows.append(len(ids) - 1)
        count = len(ids)
        host = torch.tensor(ids + positions + slots + sample_rows, dtype=torch.long)
        if self.device.type == "cuda":
            dev = host.pin_memory().to(self.device, non_blocking=True)
        else:
            dev = host
        meta = AttentionMetadata(seqs=seqs, slot_mapping=dev[2 * count:3 * count], sliding_window=self.sliding_window,
                                 block_tables=tables, page_size=page)
        return StepInputs(input_ids=dev[:count], positions=dev[count:2 * count], meta=meta,
                          sample_rows=dev[3 * count:], all_rows_sample=len(sample_rows) == count)

    @torch.inference_mode()
    def execute(self, items: list[ScheduledItem]) -> torch.Tensor:
        """Run one step; returns float32 logits [num sampling requests, vocab]."""
        if self.use_graphs and len(items) <= self.graph_bs[-1] and all(i.num_tokens == 1 for i in items):
            return self._execute_graph(items)
        inputs = self.prepare(items)
        self.backend.prepare(inputs.meta)
        start = self._event()
        hidden = self.model(inputs.input_ids, inputs.positions, self.backend, inputs.meta)
        if inputs.sample_rows.numel() == 0:
            logits = hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        elif inputs.all_rows_sample:
            logits = self.model.compute_logits(hidden).float()
        else:
            logits = self.model.compute_logits(hidden.index_select(0, inputs.sample_rows)).float()
        self._record(start)
        return logits

    def _event(self) -> Optional[torch.cuda.Event]:
        if self.timing is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _record(self, start: Optional[torch.cuda.Event]) -> None:
        if start is not None:
            self.timing.append((start, self._event()))

    # --- CUDA graphs -----------------------------------------------------------------
    def graphs_supported(self) -> bool:
        """CUDA graphs need the GPU, the fused model and a backend with static decode plans."""
        return (self.device.type == "cuda" and getattr(self.model, "fused", False)
                and hasattr(self.backend, "graph_decode_plan"))

    def capture_cuda_graphs(self, batch_sizes: Sequence[int]) -> None:
        """Capture one decode graph per batch size (largest first, one shared memory pool)."""
        sizes = sorted({int(b) for b in batch_sizes if b >= 1})
        if not sizes:
            return
        pool = None
        self._graph_plans = self.static_decode_plans(sizes)  # the graphs read their buffers: keep them
        torch.cuda.synchronize(self.device)
        with torch.inference_mode():
            for bs, plan in reversed(self._graph_plans):
                self._graph_forward(bs, plan)  # warm-up: compiles kernels, picks GEMM algorithms
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._graph_forward(bs, plan)
                pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        self.graph_bs = sizes
        self.use_graphs = True

    def static_decode_plans(self, sizes: list[int]) -> list[tuple[int, object]]:
        """Allocate the static input buffers for batches up to max(sizes); (size, plan) per size."""
        from services.engine.attention.triton_kernels import num_decode_splits
        backend = self.backend
        most = sizes[-1]
        width = -(-self.max_model_len // self.page_size)
        self._graph_width = width
        self._graph_max = most
        total = 4 * most + most * width
        self._host = torch.zeros(total, dtype=torch.int32)
        if self.device.type == "cuda":
            self._host = self._host.pin_memory()
        self._static = torch.zeros(total, dtype=torch.int32, device=self.device)
        host, dev = self._host.numpy(), self._static
        self._h_ids, self._h_pos, self._h_slots, self._h_lens = (host[i * most:(i + 1) * most] for i in range(4))
        self._h_table = host[4 * most:].reshape(most, width)
        self._s_ids, self._s_pos, self._s_slots, self._s_lens = (dev[i * most:(i + 1) * most] for i in range(4))
        self._s_table = dev[4 * most:].view(most, width)
        self._s_rows = torch.arange(most, dtype=torch.int32, device=self.device)
        self._h_slots[:] = -1
        self._h_lens[:] = 1
        self._static.copy_(self._host)
        cfg = self.model.config
        self._s_logits = torch.empty(most, cfg.vocab_size, dtype=self.model.lm_head.weight.dtype, device=self.device)
        longest = min(self.max_model_len, self.sliding_window or self.max_model_len)
        plans = []
        for bs in sizes:
            splits = num_decode_splits(bs, backend.num_kv_heads, longest, backend.num_sms)
            plans.append((bs, backend.graph_decode_plan(self._s_table[:bs], self._s_lens[:bs], self._s_rows[:bs],
                                                        splits)))
        return plans

    @torch.inference_mode()
    def reset_graph_inputs(self) -> None:
        """Make every static row a padding row (stores nothing), e.g. before replaying a graph bare."""
        self._h_ids[:] = 0
        self._h_pos[:] = 0
        self._h_slots[:] = -1
        self._h_lens[:] = 1
        self._static.copy_(self._host)

    def _graph_forward(self, bs: int, plan) -> None:
        meta = AttentionMetadata(seqs=[], slot_mapping=self._s_slots[:bs], sliding_window=self.sliding_window,
                                 plan=plan, page_size=self.page_size)
        hidden = self.model(self._s_ids[:bs], self._s_pos[:bs], self.backend, meta)
        torch.mm(hidden, self.model.lm_head.weight.t(), out=self._s_logits[:bs])

    def _execute_graph(self, items: list[ScheduledItem]) -> torch.Tensor:
        n = len(items)
        bs = self.graph_bs[bisect.bisect_left(self.graph_bs, n)]
        page = self.page_size
        ids, positions, slots, lens = [], [], [], []
        table_rows = self._h_table
        samples = True
        for i, item in enumerate(items):
            req = item.request
            pos = item.start
            table = req.block_table
            ids.append(token_at(req, pos))
            positions.append(pos)
            slots.append(table[pos // page] * page + pos % page)
            lens.append(pos + 1)
            blocks = pos // page + 1
            table_rows[i, :blocks] = table[:blocks]
            samples = samples and item.samples
        self._h_ids[:n] = ids
        self._h_pos[:n] = positions
        self._h_slots[:n] = slots
        self._h_lens[:n] = lens
        if bs > n:
            self._h_ids[n:bs] = 0
            self._h_pos[n:bs] = 0
            self._h_slots[n:bs] = -1
            self._h_lens[n:bs] = 1
        start = self._event()
        used = 4 * self._graph_max + bs * self._graph_width
        self._static[:used].copy_(self._host[:used], non_blocking=True)
        self.graphs[bs].replay()
        logits = self._s_logits[:n]
        if not samples:
            rows = torch.tensor([i for i, item in enumerate(items) if item.samples], dtype=torch.long)
            logits = logits.index_select(0, rows.to(self.device, non_blocking=True))
        logits = logits.float()
        self._record(start)
        return logits
