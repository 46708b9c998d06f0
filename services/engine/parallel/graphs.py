"""CUDA graphs for tensor-parallel decode steps: every rank captures the same graphs, rank 0 stages.

`TPCudaGraphRunner` is the runner's `CudaGraphRunner` with two changes:
- the captured forward ends in the vocab-parallel LM head: each rank's logits slice goes to a local
  static buffer and the graph all-gathers it into the whole [bs, vocab] logits buffer (the row-
  and vocab-parallel all-reduces of the model are captured inside the graph too: NCCL >= 2.9.6);
- a replay is mirrored: rank 0 stages the step on the host as always, copies it to its static
  buffers, writes a `graph` message down the children's pipes and broadcasts those buffers
  (the five row vectors, the packed block tables, and the previous step's sampled ids, which an
  overlapped step's placeholder rows gather inside the graph) into the followers' same buffers;
  then every rank scatters the tables and replays its graph of that size (`follow_replay`).

Every rank captures at the same point of start-up (rank 0 in its runner's constructor, a child
right after `setup.build_rank`), the same sizes in the same order, so the captured collectives
pair up. The warm-up's bare replays are mirrored too (`TPModelRunner.graphs`, `reset_graph_inputs`).
"""
from __future__ import annotations

import struct
from typing import Callable, Optional

import torch

from baton.services.engine.attention.base import AttentionMetadata
from baton.services.engine.parallel.group import TPGroup
from baton.services.engine.parallel.step import HEADER
from baton.services.engine.runner.cuda_graph import CudaGraphRunner

OP_GRAPH = 3
"""Replay graph `bs` on the broadcast staged inputs (header: op, bs, 0, packed table width)."""
OP_GRAPH_RESET = 4
"""Make every static row a padding row (the warm-up, before bare replays)."""
OP_GRAPH_BARE = 5
"""Replay graph `bs` as the static buffers are (a bare replay)."""


def graph_header(op: int, bs: int = 0, wide: int = 0) -> bytes:
    return HEADER.pack(op, bs, 0, wide, 0, 0, 0, 0)


def parse_graph_header(header: bytes) -> tuple[int, int, int]:
    """(op, bs, wide) of a graph message."""
    op, bs, _, wide = struct.unpack_from("<4q", header)
    return op, bs, wide


class TPCudaGraphRunner(CudaGraphRunner):
    """Decode graphs over a TP group (rank 0 passes `send`; followers replay what it stages)."""

    def __init__(self, *args, group: TPGroup, send: Optional[Callable[[bytes], None]] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        self.send = send

    def _allocate(self, sizes: list[int]):
        plans = super()._allocate(sizes)
        rows = self.model.lm_head.weight.shape[0]  # this rank's vocabulary slice
        self._s_local = torch.empty(self._max, rows, dtype=self.model.lm_head.weight.dtype, device=self.device)
        return plans

    def _forward(self, bs: int, plan) -> None:
        from baton.services.engine.models.gemv import gemv, layer_config, wants_gemv
        meta = AttentionMetadata(seqs=[], slot_mapping=self._s_slots[:bs], sliding_window=self.sliding_window,
                                 plan=plan, page_size=self.page_size)
        gidx = self._s_gidx[:bs]
        ids = torch.where(gidx >= 0, self.prev_tokens.index_select(0, gidx.clamp(min=0)), self._s_ids[:bs])
        hidden = self.model(ids, self._s_pos[:bs], self.backend, meta)
        head = self.model.lm_head
        local = self._s_local[:bs]
        if wants_gemv(hidden, head):
            gemv(hidden, head.weight, config=layer_config(head), out=local)
        else:
            torch.mm(hidden, head.weight.t(), out=local)
        vocab = self.model.config.vocab_size
        self._s_logits[:bs].copy_(self.group.all_gather_last(local)[:, :vocab])

    def _finish_inputs(self, bs: int, wide: int) -> None:
        """Rank 0, inside `replay`: hand the uploaded step to the followers, then scatter like them."""
        self.send(graph_header(OP_GRAPH, bs, wide))
        self._exchange(bs, wide)

    def _exchange(self, bs: int, wide: int) -> None:
        """Broadcast the staged buffers from rank 0 and scatter the packed tables (every rank)."""
        packed = bs * wide
        self.group.broadcast(self._static[:5 * self._max])
        self.group.broadcast(self._s_stage[:packed])
        self.group.broadcast(self.prev_tokens)
        self._s_table[:bs, :wide].copy_(self._s_stage[:packed].view(bs, wide))

    def follow_replay(self, bs: int, wide: int) -> None:
        """A follower's side of `replay`."""
        self._exchange(bs, wide)
        self.graphs[bs].replay()

    def follow(self, op: int, bs: int, wide: int) -> None:
        """A follower: run one graph message."""
        if op == OP_GRAPH:
            self.follow_replay(bs, wide)
        elif op == OP_GRAPH_RESET:
            super().reset_inputs()
        elif op == OP_GRAPH_BARE:
            self.graphs[bs].replay()
        else:
            raise RuntimeError(f"unknown graph op {op}")


class MirroredGraph:
    """Rank 0's handle on graph `bs` for a bare replay (the warm-up): the followers replay theirs too."""

    def __init__(self, runner: TPCudaGraphRunner, bs: int) -> None:
        self.runner, self.bs = runner, bs

    def replay(self) -> None:
        self.runner.send(graph_header(OP_GRAPH_BARE, self.bs))
        self.runner.graphs[self.bs].replay()
