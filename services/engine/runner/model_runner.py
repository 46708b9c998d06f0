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

Overlap scheduling: an input token that is still a placeholder (`PENDING_TOKEN`, sampled by
the previous step and not yet read back by the host) is taken on the GPU from `prev_tokens`
(the previous step's sampled ids, written by `publish_tokens`) at the request's
`pending_row`; graphs do this gather themselves from a static index buffer. The graph
inputs' pinned host mirror is double-buffered, so filling step N+1's inputs never races the
still-queued copy of step N's.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from baton.services.engine.attention.base import AttentionBackend, AttentionMetadata, SequenceSlice
from baton.services.engine.models.llama import LlamaForCausalLM
from baton.services.engine.request import PENDING_TOKEN, Request
from baton.services.engine.scheduling.scheduler import ScheduledItem


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
                 cuda_graph_bs: Sequence[int] = (), max_rows: int = 1024) -> None:
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
        self.max_rows = max(1, max_rows, max(cuda_graph_bs, default=0))
        self.prev_tokens = torch.zeros(self.max_rows, dtype=torch.int32, device=device)
        """The last overlapped step's sampled token ids (GPU), read by the next step's placeholder inputs."""
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
        gather_dst: list[int] = []
        gather_src: list[int] = []
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
            if ids[-1] == PENDING_TOKEN:  # only a request's last token can be pending
                gather_dst.append(len(ids) - 1)
                gather_src.append(req.pending_row)
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
        host = torch.tensor(ids + positions + slots + sample_rows + gather_dst + gather_src, dtype=torch.long)
        if self.device.type == "cuda":
            dev = host.pin_memory().to(self.device, non_blocking=True)
        else:
            dev = host
        if gather_dst:
            g, base = len(gather_dst), 3 * count + len(sample_rows)
            dst, src = dev[base:base + g], dev[base + g:base + 2 * g]
            dev[:count].index_put_((dst,), self.prev_tokens.index_select(0, src).long())
        dev_rows = dev[3 * count:3 * count + len(sample_rows)]
        meta = AttentionMetadata(seqs=seqs, slot_mapping=dev[2 * count:3 * count], sliding_window=self.sliding_window,
                                 block_tables=tables, page_size=page)
        return StepInputs(input_ids=dev[:count], positions=dev[count:2 * count], meta=meta,
                          sample_rows=dev_rows, all_rows_sample=len(sample_rows) == count)

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

    def publish_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
        """Keep a step's sampled ids [n] on the device for the next step's inputs and start copying
        them to the host; returns (host tensor, event to wait on before reading it; None on CPU)."""
        n = tokens.shape[0]
        self.prev_tokens[:n].copy_(tokens)
        if self.device.type != "cuda":
            return tokens, None
        host = torch.empty(n, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

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
        from baton.services.engine.attention.triton_kernels import num_decode_splits
        backend = self.backend
        most = sizes[-1]
        width = -(-self.max_model_len // self.page_size)
        self._graph_width = width
        self._graph_max = most
        total = 5 * most + most * width
        self._hosts = []
        self._host_views = []
        for _ in range(2):  # double-buffered: step N+1 is filled while step N's copy may still be queued
            buf = torch.zeros(total, dtype=torch.int32)
            if self.device.type == "cuda":
                buf = buf.pin_memory()
            h = buf.numpy()
            views = tuple(h[i * most:(i + 1) * most] for i in range(5)) + (h[5 * most:].reshape(most, width),)
            views[2][:] = -1  # slots: padding rows store nothing
            views[3][:] = 1   # lens
            views[4][:] = -1  # gather index: the token id is in the ids row
            self._hosts.append(buf)
            self._host_views.append(views)
        self._host_events: list[Optional[torch.cuda.Event]] = [None, None]
        self._host_next = 0
        self._host = self._hosts[0]
        self._h_ids, self._h_pos, self._h_slots, self._h_lens, self._h_gidx, self._h_table = self._host_views[0]
        self._static = torch.zeros(total, dtype=torch.int32, device=self.device)
        dev = self._static
        self._s_ids, self._s_pos, self._s_slots, self._s_lens, self._s_gidx = (
            dev[i * most:(i + 1) * most] for i in range(5))
        self._s_table = dev[5 * most:].view(most, width)
        self._s_rows = torch.arange(most, dtype=torch.int32, device=self.device)
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
        torch.cuda.synchronize(self.device)
        for h_ids, h_pos, h_slots, h_lens, h_gidx, _ in self._host_views:
            h_ids[:] = 0
            h_pos[:] = 0
            h_slots[:] = -1
            h_lens[:] = 1
            h_gidx[:] = -1
        self._static.copy_(self._host)

    def _graph_forward(self, bs: int, plan) -> None:
        from baton.services.engine.models.gemv import gemv, layer_config, wants_gemv
        meta = AttentionMetadata(seqs=[], slot_mapping=self._s_slots[:bs], sliding_window=self.sliding_window,
                                 plan=plan, page_size=self.page_size)
        gidx = self._s_gidx[:bs]  # rows whose token is the previous step's, still on the GPU
        ids = torch.where(gidx >= 0, self.prev_tokens.index_select(0, gidx.clamp(min=0)), self._s_ids[:bs])
        hidden = self.model(ids, self._s_pos[:bs], self.backend, meta)
        head = self.model.lm_head
        if wants_gemv(hidden, head):
            gemv(hidden, head.weight, config=layer_config(head), out=self._s_logits[:bs])
        else:
            torch.mm(hidden, head.weight.t(), out=self._s_logits[:bs])

    def _execute_graph(self, items: list[ScheduledItem]) -> torch.Tensor:
        n = len(items)
        bs = self.graph_bs[bisect.bisect_left(self.graph_bs, n)]
        page = self.page_size
        ids, positions, slots, lens, gidx = [], [], [], [], []
        k = self._host_next
        self._host_next = 1 - k
        if self._host_events[k] is not None:
            self._host_events[k].synchronize()  # this mirror's last copy (two steps back) has been read
        h_ids, h_pos, h_slots, h_lens, h_gidx, table_rows = self._host_views[k]
        samples = True
        for i, item in enumerate(items):
            req = item.request
            pos = item.start
            table = req.block_table
            token = token_at(req, pos)
            ids.append(token)
            gidx.append(req.pending_row if token == PENDING_TOKEN else -1)
            positions.append(pos)
            slots.append(table[pos // page] * page + pos % page)
            lens.append(pos + 1)
            blocks = pos // page + 1
            table_rows[i, :blocks] = table[:blocks]
            samples = samples and item.samples
        h_ids[:n] = ids
        h_pos[:n] = positions
        h_slots[:n] = slots
        h_lens[:n] = lens
        h_gidx[:n] = gidx
        if bs > n:
            h_ids[n:bs] = 0
            h_pos[n:bs] = 0
            h_slots[n:bs] = -1
            h_lens[n:bs] = 1
            h_gidx[n:bs] = -1
        start = self._event()
        used = 5 * self._graph_max + bs * self._graph_width
        self._static[:used].copy_(self._hosts[k][:used], non_blocking=True)
        if self.device.type == "cuda":
            event = self._host_events[k] or torch.cuda.Event()
            event.record()
            self._host_events[k] = event
        self.graphs[bs].replay()
        logits = self._s_logits[:n]
        if not samples:
            rows = torch.tensor([i for i, item in enumerate(items) if item.samples], dtype=torch.long)
            logits = logits.index_select(0, rows.pin_memory().to(self.device, non_blocking=True))
        logits = logits.float()
        self._record(start)
        return logits
