"""Rank 0's model runner, which hands every step to the other ranks, and their follow loop.

`TPModelRunner` is the engine's `ModelRunner` (it prepares the step from the scheduled items as
always) whose `execute` first sends the step to the followers (the message down their pipes,
the tensors by broadcast) and then runs the sharded forward like them (`step.run_step`): the
engine, the scheduler and the sampler above it are unchanged and run on rank 0 only. On CUDA,
decode steps replay captured graphs that every rank captured alike (`graphs.py`); prefill and
mixed steps run eagerly (no piecewise graphs under TP).

`follow` is a child rank's whole life after start-up: read a step (or a graph replay), receive
its tensors, run it; until rank 0 says stop or its pipe ends.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from baton.services.engine.attention.base import AttentionBackend
from baton.services.engine.parallel.graphs import OP_GRAPH, OP_GRAPH_BARE, OP_GRAPH_RESET, MirroredGraph, \
    TPCudaGraphRunner, graph_header, parse_graph_header
from baton.services.engine.parallel.group import TPGroup
from baton.services.engine.parallel.step import HEADER, OP_STEP, OP_STOP, StepMessage, inputs_from, message_of, \
    run_step, tensors_of
from baton.services.engine.runner import prompt_logprobs
from baton.services.engine.runner.cuda_graph import CudaGraphRunner
from baton.services.engine.runner.model_runner import ModelRunner
from baton.services.engine.scheduling.scheduler import ScheduledItem

log = logging.getLogger(__name__)


class TPModelRunner(ModelRunner):
    """Rank 0's runner: every step is broadcast to the other ranks before it runs here."""

    def __init__(self, model, backend: AttentionBackend, page_size: int, device: torch.device, *,
                 group: TPGroup, send: Callable[[bytes], None], close: Optional[Callable[[], None]] = None,
                 on_failure: Optional[Callable[[str], None]] = None, cuda_graph_bs: Sequence[int] = (),
                 **kwargs) -> None:
        super().__init__(model, backend, page_size, device, **kwargs)  # TP graphs are captured below; no piecewise
        self.group = group
        self._send = send
        self._close = close
        self._on_failure = on_failure
        """Called when a step failed here after the followers got it: the ranks are out of step."""
        self.rank_pids: list[int] = []
        """Process ids of ranks 1.. (set by launch)."""
        self.cuda_graphs = TPCudaGraphRunner(model, backend, page_size, device, self.max_model_len, self.prev_tokens,
                                             group=group, send=send)
        if cuda_graph_bs and self.graphs_supported():
            self.capture_cuda_graphs(cuda_graph_bs)  # the followers capture the same sizes now

    @torch.inference_mode()
    def execute(self, items: list[ScheduledItem]) -> torch.Tensor:
        if self.use_graphs and self.cuda_graphs.can_replay(items) and \
                not any(prompt_logprobs.wants(i.request) for i in items):
            return self._in_step(self._execute_graph, items)  # TPCudaGraphRunner.replay hands it to the followers
        inputs = self.prepare(items)
        return self._in_step(self._run_eager, inputs)

    def _run_eager(self, inputs) -> torch.Tensor:
        self._send(message_of(inputs).encode())
        self.group.broadcast(tensors_of(inputs))
        return run_step(self.model, self.backend, inputs)

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """An embedding forward: to the followers as a step that samples nothing (they run the forward only)."""
        message = StepMessage(OP_STEP, int(input_ids.shape[0]), [(s.query_start, s.query_len, s.prefix_len)
                                                                 for s in meta.seqs],
                              0, False, list(meta.block_tables or []), [])

        def run(_) -> torch.Tensor:
            self._send(message.encode())
            self.group.broadcast(torch.cat([input_ids, positions, meta.slot_mapping]).long())
            return super(TPModelRunner, self).forward_hidden(input_ids, positions, meta)
        return self._in_step(run, None)

    def _in_step(self, run: Callable, arg) -> torch.Tensor:
        """Run a step that the followers take part in; an error in it leaves the ranks out of step
        (a follower may wait inside a collective rank 0 will never join), so it is fatal."""
        try:
            return run(arg)
        except BaseException as error:
            if self._on_failure is not None:
                self._on_failure(f"tensor-parallel rank 0 failed inside a step ({error!r}); the ranks are out of "
                                 f"step: stopping this engine")
            raise

    @property
    def graphs(self) -> dict:
        """Each captured size's graph, for bare replays that the followers mirror (the warm-up)."""
        return {bs: MirroredGraph(self.cuda_graphs, bs) for bs in self.cuda_graphs.graphs}

    def reset_graph_inputs(self) -> None:
        self._send(graph_header(OP_GRAPH_RESET))
        super().reset_graph_inputs()

    def close(self) -> None:
        """Stop the other ranks (they exit); the engine cannot step afterwards."""
        if self._close is not None:
            self._close()
            self._close = None


def follower_graphs(model, backend: AttentionBackend, page_size: int, device: torch.device, max_model_len: int,
                    max_rows: int, sizes: Sequence[int], group: TPGroup) -> Optional[TPCudaGraphRunner]:
    """A child rank's decode graphs: the sizes rank 0 captures, captured at the same time (None: no graphs)."""
    if not sizes or model.config.mrope_section or not CudaGraphRunner.supported(model, backend, device):
        return None
    prev = torch.zeros(max(1, max_rows, max(sizes)), dtype=torch.int32, device=device)
    graphs = TPCudaGraphRunner(model, backend, page_size, device, max_model_len, prev, group=group)
    return graphs if graphs.capture(sizes) else None


def follow(group: TPGroup, model, backend: AttentionBackend, page_size: int,
           read: Callable[[int], Optional[bytes]], graphs: Optional[TPCudaGraphRunner] = None) -> str:
    """A child rank's loop: run every step rank 0 sends. `read(n)` returns exactly n bytes of
    rank 0's pipe, or None at its end. Returns why it stopped ("stop" or "rank 0 gone")."""
    sliding_window = model.config.sliding_window
    steps = 0
    while True:
        header = read(HEADER.size)
        if header is None:
            return "rank 0 gone"
        body = read(StepMessage.body_bytes(header))
        if body is None:
            return "rank 0 gone"
        op = HEADER.unpack(header)[0]
        if op == OP_STOP:
            log.info("tensor-parallel rank %d: stop after %d steps", group.rank, steps)
            return "stop"
        if op in (OP_GRAPH, OP_GRAPH_RESET, OP_GRAPH_BARE):
            if graphs is None:
                raise RuntimeError(f"tensor-parallel rank {group.rank}: rank 0 replays a CUDA graph this rank lacks")
            with torch.inference_mode():
                graphs.follow(*parse_graph_header(header))
            steps += 1
            continue
        if op != OP_STEP:
            raise RuntimeError(f"tensor-parallel rank {group.rank}: unknown op {op} from rank 0")
        message = StepMessage.decode(header, body)
        tensor = torch.empty(message.tensor_len, dtype=torch.long, device=group.device)
        group.broadcast(tensor)
        with torch.inference_mode():
            run_step(model, backend, inputs_from(message, tensor, page_size, sliding_window, backend))
        steps += 1
