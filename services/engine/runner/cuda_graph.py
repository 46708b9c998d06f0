"""CUDA graphs for decode steps: capture, replay, and the static buffers the graphs read.

Owns one graph per captured batch size (captured largest first in one shared memory pool,
after a warm-up run that compiles kernels and picks GEMM algorithms) and everything those
graphs keep alive: the static input buffers on the GPU (token ids, positions, slot mapping,
sequence lengths, gather index, block tables), their double-buffered pinned host mirror,
the attention backend's static decode plans (a fixed split count and its own workspace per
size) and the one logits buffer every graph writes into.

A decode-only step of n <= the largest captured size replays the graph of the next captured
size up: the host fills the mirror's first n rows (the others are padding rows, which store
nothing, slot -1, and attend to one key), one asynchronous copy moves it to the static
buffers, the graph replays, and the first n logits rows are the step's. The mirror is
double-buffered so filling step N+1's inputs never races the still-queued copy of step N's.
Block tables are staged narrow: the mirror packs each row to the step's widest table (W
blocks, not max_model_len / page_size), one copy moves those bs x W ids to a device staging
buffer, and a device copy scatters them into the first W columns of the graph's [bs, width]
table (the kernels read no column past a row's length). For a 128k-token model at batch 512
that is the difference between copying 16 MB of ids per step and copying what is used.
A row whose token is still a placeholder (`PENDING_TOKEN`) carries its `pending_row` in the
gather index; the graph takes that token from the runner's `prev_tokens` on the GPU.
Sampling stays outside the graph.
"""
from __future__ import annotations

import bisect
from typing import Optional, Sequence

import torch

from baton.services.engine.attention.base import AttentionBackend, AttentionMetadata
from baton.services.engine.models.llama import LlamaForCausalLM
from baton.services.engine.request import PENDING_TOKEN
from baton.services.engine.runner.positions import token_at
from baton.services.engine.scheduling.scheduler import ScheduledItem
from baton.services.engine.host_copy import to_device_async


class CudaGraphRunner:
    """The captured decode graphs of one model runner."""

    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, page_size: int,
                 device: torch.device, max_model_len: int, prev_tokens: torch.Tensor) -> None:
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.device = device
        self.max_model_len = max_model_len
        self.sliding_window = model.config.sliding_window
        self.prev_tokens = prev_tokens
        """The runner's previous sampled ids (GPU); placeholder rows gather from it inside the graph."""
        self.batch_sizes: list[int] = []
        """Captured batch sizes, ascending (empty until `capture`)."""
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        """One graph per captured batch size."""

    @staticmethod
    def supported(model: LlamaForCausalLM, backend: AttentionBackend, device: torch.device) -> bool:
        """CUDA graphs need the GPU, the fused model and a backend with static decode plans."""
        return (device.type == "cuda" and getattr(model, "fused", False)
                and hasattr(backend, "graph_decode_plan"))

    def can_replay(self, items: list[ScheduledItem]) -> bool:
        """True for a decode-only step no larger than the largest captured graph."""
        return len(items) <= self.batch_sizes[-1] and all(i.num_tokens == 1 for i in items)

    # --- capture ---------------------------------------------------------------------
    def capture(self, batch_sizes: Sequence[int]) -> bool:
        """Capture one decode graph per batch size (largest first, one shared memory pool);
        False (nothing captured) when no size is at least 1."""
        sizes = sorted({int(b) for b in batch_sizes if b >= 1})
        if not sizes:
            return False
        pool = None
        self._plans = self._allocate(sizes)  # the graphs read their buffers: keep them
        torch.cuda.synchronize(self.device)
        with torch.inference_mode():
            for bs, plan in reversed(self._plans):
                self._forward(bs, plan)  # warm-up: compiles kernels, picks GEMM algorithms
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(bs, plan)
                pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        self.batch_sizes = sizes
        return True

    def _allocate(self, sizes: list[int]) -> list[tuple[int, object]]:
        """Allocate the static input buffers for batches up to max(sizes); (size, plan) per size."""
        from baton.services.engine.attention.triton_kernels import num_decode_splits
        backend = self.backend
        most = sizes[-1]
        width = -(-self.max_model_len // self.page_size)
        self._width = width
        self._max = most
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
        self._static = torch.zeros(total, dtype=torch.int32, device=self.device)
        dev = self._static
        self._s_ids, self._s_pos, self._s_slots, self._s_lens, self._s_gidx = (
            dev[i * most:(i + 1) * most] for i in range(5))
        self._s_table = dev[5 * most:].view(most, width)
        self._s_rows = torch.arange(most, dtype=torch.int32, device=self.device)
        self._static.copy_(self._hosts[0])
        self._s_stage = torch.zeros(most * width, dtype=torch.int32, device=self.device)
        """Device landing of the packed [bs, W] tables before they are scattered into `_s_table`."""
        cfg = self.model.config
        self._s_logits = torch.empty(most, cfg.vocab_size, dtype=self.model.lm_head.weight.dtype, device=self.device)
        longest = min(self.max_model_len, self.sliding_window or self.max_model_len)
        plans = []
        for bs in sizes:
            splits = num_decode_splits(bs, backend.num_kv_heads, longest, backend.num_sms)
            plans.append((bs, backend.graph_decode_plan(self._s_table[:bs], self._s_lens[:bs], self._s_rows[:bs],
                                                        splits)))
        return plans

    def _forward(self, bs: int, plan) -> None:
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

    @torch.inference_mode()
    def reset_inputs(self) -> None:
        """Make every static row a padding row (stores nothing), e.g. before replaying a graph bare."""
        torch.cuda.synchronize(self.device)
        for h_ids, h_pos, h_slots, h_lens, h_gidx, _ in self._host_views:
            h_ids[:] = 0
            h_pos[:] = 0
            h_slots[:] = -1
            h_lens[:] = 1
            h_gidx[:] = -1
        self._static.copy_(self._hosts[0])

    # --- replay ----------------------------------------------------------------------
    def stage(self, items: list[ScheduledItem]) -> None:
        """Fill the next host mirror with a decode step's rows (padding rows after them), for `replay`."""
        n = len(items)
        bs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        page = self.page_size
        ids, positions, slots, lens, gidx = [], [], [], [], []
        k = self._host_next
        self._host_next = 1 - k
        if self._host_events[k] is not None:
            self._host_events[k].synchronize()  # this mirror's last copy (two steps back) has been read
        h_ids, h_pos, h_slots, h_lens, h_gidx, _ = self._host_views[k]
        wide = max(item.start // page + 1 for item in items)
        table_rows = self.packed_tables(k, bs, wide)
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
        self._staged = (k, bs, samples, wide)

    def packed_tables(self, k: int, bs: int, wide: int):
        """Mirror k's table region as packed [bs, wide] rows (numpy view; what `replay` copies)."""
        return self._hosts[k].numpy()[5 * self._max:5 * self._max + bs * wide].reshape(bs, wide)

    def replay(self, items: list[ScheduledItem]) -> torch.Tensor:
        """Copy the mirror `stage(items)` filled to the static buffers and replay the graph;
        returns float32 logits [sampling requests among items, vocab]."""
        k, bs, samples, wide = self._staged
        head, packed = 5 * self._max, bs * wide
        self._static[:head].copy_(self._hosts[k][:head], non_blocking=True)
        self._s_stage[:packed].copy_(self._hosts[k][head:head + packed], non_blocking=True)
        if self.device.type == "cuda":
            event = self._host_events[k] or torch.cuda.Event()
            event.record()  # this mirror may be refilled once its copies are done
            self._host_events[k] = event
        self._finish_inputs(bs, wide)
        self.graphs[bs].replay()
        logits = self._s_logits[:len(items)]
        if not samples:
            rows = torch.tensor([i for i, item in enumerate(items) if item.samples], dtype=torch.long)
            logits = logits.index_select(0, to_device_async(rows, self.device))
        return logits.float()

    def _finish_inputs(self, bs: int, wide: int) -> None:
        """After the uploads, before the replay: scatter the packed tables into the graph's table
        (a tensor-parallel runner hands the inputs to its other ranks first)."""
        self._s_table[:bs, :wide].copy_(self._s_stage[:bs * wide].view(bs, wide))
