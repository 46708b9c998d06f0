"""Turns a scheduled step into tensors, runs the model, and returns the logits to sample.

Owns the flattening of a step's sequences into one token batch (input ids, positions, KV
slot of every new token, the block table of every sequence, their context slots only for
a backend that reads them) and the choice of rows whose logits are computed (the last
token of every request that samples this step).

Host work per step grows with the sequences, not with their tokens: one Python pass over
the items collects per-sequence integers (start, length, the blocks under the new tokens), then
numpy builds the per-token arrays (token ids as slices of each prompt's cached numpy array,
positions, KV slots) into one int64 buffer, which travels in one pinned buffer and one
asynchronous copy; no per-sequence tensors (a backend that reads context slots gets views of
one tensor) and no device-to-host copy. `bench/host_step_cpu.py` measures it.

CUDA graphs (GPU, fused model, Triton backend): decode-only steps of up to the largest
captured batch size replay a captured graph instead (`cuda_graph.CudaGraphRunner` owns the
graphs and their static buffers; `use_graphs`, `graph_bs`, `graphs`, `capture_cuda_graphs`
and `reset_graph_inputs` here are its switch and its view).

Prompt logprobs (`prompt_logprobs.py`): the positions of a prefill chunk whose logits give a
prompt token's logprob are computed too, in slices, and handed back on the step's items
(`ScheduledItem.prompt_logprobs`); such a step never replays a graph.

Overlap scheduling: an input token that is still a placeholder (`PENDING_TOKEN`, sampled by
the previous step and not yet read back by the host) is taken on the GPU from `prev_tokens`
(the previous step's sampled ids, written by `publish_tokens`) at the request's
`pending_row`; graphs do this gather themselves from a static index buffer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from baton.services.engine.attention.base import AttentionBackend, AttentionMetadata, SequenceSlice
from baton.services.engine.models.llama import LlamaForCausalLM
from baton.services.engine.request import PENDING_TOKEN
from baton.services.engine.runner import prompt_logprobs
from baton.services.engine.runner.prompt_logprobs import PromptRows
from baton.services.engine.runner.cuda_graph import CudaGraphRunner
from baton.services.engine.runner.piecewise_graph import capture_piecewise
from baton.services.engine.runner.multimodal_step import MultimodalStep
from baton.services.engine.runner.positions import context_slots, step_positions, step_slots, token_array
from baton.services.engine.scheduling.scheduler import ScheduledItem
from baton.services.engine.host_copy import to_device_async


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
    prompt_rows: PromptRows = field(default_factory=PromptRows)
    """The rows whose logits give prompt logprobs (none unless a request asked for them)."""
    model_kwargs: dict = field(default_factory=dict)
    """Image inputs of the step (`multimodal_step`): input_embeds, mrope_positions; empty for text."""


class ModelRunner:
    """Runs the model on the KV cache through an attention backend."""

    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, page_size: int,
                 device: torch.device, max_model_len: Optional[int] = None,
                 cuda_graph_bs: Sequence[int] = (), max_rows: int = 1024, piecewise_max_tokens: int = 0) -> None:
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.device = device
        self.sliding_window = model.config.sliding_window
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.timing: Optional[list[tuple[torch.cuda.Event, torch.cuda.Event]]] = None
        """When a list (CUDA only): each execute appends (start, end) events around its device work."""
        self.use_graphs = False
        """Replay captured graphs for decode-only steps (set by `capture_cuda_graphs`)."""
        self.max_rows = max(1, max_rows, max(cuda_graph_bs, default=0))
        self.prev_tokens = torch.zeros(self.max_rows, dtype=torch.int32, device=device)
        """The last overlapped step's sampled token ids (GPU), read by the next step's placeholder inputs."""
        self.cuda_graphs = CudaGraphRunner(model, backend, page_size, device, self.max_model_len, self.prev_tokens)
        """The captured decode graphs (none until `capture_cuda_graphs`)."""
        if cuda_graph_bs and self.graphs_supported():
            self.capture_cuda_graphs(cuda_graph_bs)
        self.piecewise = capture_piecewise(model, backend, device, piecewise_max_tokens)
        """Piecewise graphs for prefill and mixed steps of up to `piecewise_max_tokens` tokens (None: eager)."""

    # --- eager steps -----------------------------------------------------------------
    def prepare(self, items: list[ScheduledItem]) -> StepInputs:
        """Build the step's tensors from the scheduled items (see the module doc: per-sequence
        Python, per-token numpy)."""
        page = self.page_size
        starts: list[int] = []
        lens: list[int] = []
        firsts: list[int] = []
        blocks: list[int] = []
        """The blocks under each sequence's new tokens, sequence after sequence."""
        block_base: list[int] = []
        single_rows: list[int] = []
        single_ids: list[int] = []
        chunks: list[tuple[int, Any, int, int]] = []
        """(first row, request, start, end) of every multi-token sequence."""
        seqs: list[SequenceSlice] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        gather_dst: list[int] = []
        gather_src: list[int] = []
        prompt_rows = PromptRows()
        images: Optional[MultimodalStep] = None
        count = 0
        for item in items:
            req = item.request
            start, n = item.start, item.num_tokens
            end = start + n
            table, prompt, output = req.block_table, req.prompt_token_ids, req.output_token_ids
            first, count = count, count + n
            starts.append(start)
            lens.append(n)
            firsts.append(first)
            block = start // page
            block_base.append(len(blocks) - block)
            p = len(prompt)
            if n == 1:
                last = prompt[start] if start < p else output[start - p]
                single_rows.append(first)
                single_ids.append(last)
                blocks.append(table[block])
            else:
                chunks.append((first, req, start, end))
                blocks.extend(table[block:(end - 1) // page + 1])
                last = output[end - 1 - p] if end > p else 0
            if last == PENDING_TOKEN:  # only a request's last token can be pending
                gather_dst.append(count - 1)
                gather_src.append(req.pending_row)
            tables.append(table[:(end + page - 1) // page])
            seqs.append(SequenceSlice(query_start=first, query_len=n, prefix_len=start))
            if end == p + len(output):  # item.samples
                sample_rows.append(count - 1)
            if req.params.prompt_logprobs is not None:
                prompt_rows.add(item, first)
            if req.multimodal is not None:
                images = images or MultimodalStep(bool(self.model.config.mrope_section))
                images.add(req.multimodal, start, end, first, len(req.prompt_token_ids))
        rows, g = len(sample_rows), len(gather_dst)
        buf = np.empty(3 * count + rows + 2 * g, dtype=np.int64)
        ids, positions, slots = buf[:count], buf[count:2 * count], buf[2 * count:3 * count]
        seq_of_row = step_positions(starts, lens, firsts, count, positions)
        step_slots(positions, seq_of_row, blocks, block_base, page, slots)
        if single_rows:
            ids[single_rows] = single_ids
        for first, req, start, end in chunks:
            ids[first:first + end - start] = token_array(req, start, end)
        tail = buf[3 * count:]
        tail[:rows] = sample_rows
        tail[rows:rows + g] = gather_dst
        tail[rows + g:] = gather_src
        host = torch.from_numpy(buf)
        if self.device.type == "cuda":
            dev = to_device_async(host, self.device)
        else:
            dev = host
        if self.backend.uses_context_slots:
            for seq, context in zip(seqs, context_slots(tables, [s.context_len for s in seqs], page, self.device)):
                seq.context_slots = context
        if gather_dst:
            base = 3 * count + rows
            dst, src = dev[base:base + g], dev[base + g:base + 2 * g]
            dev[:count].index_put_((dst,), self.prev_tokens.index_select(0, src).long())
        dev_rows = dev[3 * count:3 * count + rows]
        meta = AttentionMetadata(seqs=seqs, slot_mapping=dev[2 * count:3 * count], sliding_window=self.sliding_window,
                                 block_tables=tables, page_size=page)
        return StepInputs(input_ids=dev[:count], positions=dev[count:2 * count], meta=meta,
                          sample_rows=dev_rows, all_rows_sample=rows == count, prompt_rows=prompt_rows,
                          model_kwargs=images.model_kwargs(dev[count:2 * count], self.device) if images else {})

    @torch.inference_mode()
    def execute(self, items: list[ScheduledItem]) -> torch.Tensor:
        """Run one step; returns float32 logits [num sampling requests, vocab]."""
        if self.use_graphs and self.cuda_graphs.can_replay(items) and \
                not any(prompt_logprobs.wants(i.request) for i in items):
            return self._execute_graph(items)
        inputs = self.prepare(items)
        self.backend.prepare(inputs.meta)
        start = self._event()
        if self.piecewise is not None and not inputs.model_kwargs and self.piecewise.can_run(len(inputs.input_ids)):
            hidden = self.piecewise.run(inputs.input_ids, inputs.positions, inputs.meta)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.backend, inputs.meta, **inputs.model_kwargs)
        if inputs.prompt_rows.rows:
            inputs.prompt_rows.compute(self.model.compute_logits, hidden)
        if inputs.sample_rows.numel() == 0:
            logits = hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        elif inputs.all_rows_sample:
            logits = self.model.compute_logits(hidden).float()
        else:
            logits = self.model.compute_logits(hidden.index_select(0, inputs.sample_rows)).float()
        self._record(start)
        return logits

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor,
                       meta: AttentionMetadata) -> torch.Tensor:
        """Final-norm hidden states of a batch run outside a step (embeddings, `pooling.py`); a
        tensor-parallel runner hands it to the other ranks first."""
        self.backend.prepare(meta)
        return self.model(input_ids, positions, self.backend, meta)

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
    @property
    def graph_bs(self) -> list[int]:
        """The captured decode batch sizes, ascending (empty without graphs)."""
        return self.cuda_graphs.batch_sizes

    @property
    def graphs(self) -> dict[int, torch.cuda.CUDAGraph]:
        """The captured graph of each batch size."""
        return self.cuda_graphs.graphs

    def graphs_supported(self) -> bool:
        """CUDA graphs need the GPU, the fused model and a backend with static decode plans (and no
        multimodal rope: an image request's decode positions add its delta, which graphs do not)."""
        return not self.model.config.mrope_section and CudaGraphRunner.supported(self.model, self.backend, self.device)

    def capture_cuda_graphs(self, batch_sizes: Sequence[int]) -> None:
        """Capture one decode graph per batch size and replay them from now on."""
        if self.cuda_graphs.capture(batch_sizes):
            self.use_graphs = True

    def reset_graph_inputs(self) -> None:
        """Make every static row a padding row (stores nothing), e.g. before replaying a graph bare."""
        self.cuda_graphs.reset_inputs()

    def _execute_graph(self, items: list[ScheduledItem]) -> torch.Tensor:
        self.cuda_graphs.stage(items)
        start = self._event()
        logits = self.cuda_graphs.replay(items)
        self._record(start)
        return logits
