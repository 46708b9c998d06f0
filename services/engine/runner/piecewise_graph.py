"""Piecewise CUDA graphs for prefill and mixed steps: everything but attention replayed.

Owns, per captured token count T (a bucket), one graph per piece of the fused Llama forward
and the static buffers the pieces hand each other. A step of n <= T tokens that decode
graphs cannot take (a prefill chunk, or prefill chunks mixed with decode tokens) runs as

    piece 0   embed, rotary tables, layer 0's input norm, QKV, RoPE + K/V store   (graph)
    attend 0  attention of layer 0 over the cache, eager, into the static buffer
    piece i   layer i-1's O projection, norm, MLP, then layer i's norm, QKV, RoPE  (graph)
    attend i  ...
    piece L   layer L-1's O projection, norm, MLP, the final norm                  (graph)

so the host launches L + 1 graphs and L attention calls instead of ten kernels a layer.
An H200 profile showed a 128-token eager prefill step of a Llama-3.1-8B-shaped model
taking 11-22 ms of host time for a few ms of GPU work (cuBLAS and Triton launch costs);
vLLM runs the same pieces under piecewise graphs (its torch.compile splitting at
attention). Attention stays eager because its grid follows the step's sequences.

Padding rows (n..T) carry slot -1 (their K/V is stored nowhere) and whatever ids and
positions the buffers last held; attention reads only the step's n rows, so padding rows
compute garbage that nothing reads. Every piece writes its results into the static
buffers (q, residual, hidden), never leaving a tensor from the graphs' shared memory pool
alive across pieces, so all graphs share one pool. Steps with image embeddings or
multimodal rope, or more than the largest bucket's tokens, run eagerly.
"""
from __future__ import annotations

import bisect
from typing import Optional, Sequence

import torch

from baton.services.engine.attention.base import AttentionBackend, AttentionMetadata
from baton.services.engine.models.llama import LlamaForCausalLM


def piecewise_buckets(max_tokens: int) -> list[int]:
    """Token counts to capture, none below 16: steps of 16 up to 64, of 32 up to 256, of 64 above
    (a 300-token step pads to 320, not 512), plus `max_tokens` itself."""
    sizes, t = [], 16
    while t <= max_tokens:
        sizes.append(t)
        t += 16 if t < 64 else 32 if t < 256 else 64
    if max_tokens >= 16 and sizes[-1] != max_tokens:
        sizes.append(max_tokens)
    return sizes


class PiecewiseGraphs:
    """The captured piecewise graphs of one model runner."""

    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.device = device
        self.buckets: list[int] = []
        """Captured token counts, ascending (empty until `capture`)."""
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        """Per bucket, its L + 1 piece graphs in order."""
        self.replays = 0
        """Steps run through the graphs so far."""

    @staticmethod
    def supported(model: LlamaForCausalLM, backend: AttentionBackend, device: torch.device) -> bool:
        """The fused model on CUDA with a backend whose attention runs on its own (`attend`)."""
        return (device.type == "cuda" and getattr(model, "fused", False)
                and type(backend).attend is not AttentionBackend.attend  # the base class only raises
                and not model.config.mrope_section)

    def can_run(self, num_tokens: int) -> bool:
        return bool(self.buckets) and 0 < num_tokens <= self.buckets[-1]

    # --- capture ---------------------------------------------------------------------
    def capture(self, buckets: Sequence[int]) -> bool:
        """Capture every piece for each bucket (largest first, one pool); False when none."""
        sizes = sorted({int(b) for b in buckets if b >= 1})
        if not sizes:
            return False
        self._allocate(sizes[-1])
        pool = None
        torch.cuda.synchronize(self.device)
        with torch.inference_mode():
            for t in reversed(sizes):
                for piece in range(self.num_pieces):
                    self._piece(piece, t)  # warm-up: compiles kernels, picks GEMM algorithms
                torch.cuda.synchronize(self.device)
                graphs = []
                for piece in range(self.num_pieces):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._piece(piece, t)
                    pool = graph.pool()
                    graphs.append(graph)
                self.graphs[t] = graphs
        torch.cuda.synchronize(self.device)
        self.buckets = sizes
        return True

    @property
    def num_pieces(self) -> int:
        return self.model.config.num_layers + 1

    def _allocate(self, most: int) -> None:
        cfg, dtype, dev = self.model.config, self.model.lm_head.weight.dtype, self.device
        attn = self.model.model.layers[0].self_attn
        self._ids = torch.zeros(most, dtype=torch.long, device=dev)
        self._pos = torch.zeros(most, dtype=torch.long, device=dev)
        self._slots = torch.full((most,), -1, dtype=torch.long, device=dev)
        self._cos = torch.zeros(most, cfg.head_dim, dtype=dtype, device=dev)
        self._sin = torch.zeros(most, cfg.head_dim, dtype=dtype, device=dev)
        self._q = torch.zeros(most, attn.num_heads, cfg.head_dim, dtype=dtype, device=dev)
        self._attn = torch.zeros(most, attn.num_heads * cfg.head_dim, dtype=dtype, device=dev)
        self._res = torch.zeros(most, cfg.hidden_size, dtype=dtype, device=dev)
        self._hidden = torch.zeros(most, cfg.hidden_size, dtype=dtype, device=dev)

    def _piece(self, piece: int, t: int) -> None:
        """Piece `piece` of a `t`-token step, reading and writing only the static buffers."""
        from baton.services.engine.models.gemv import linear
        from baton.services.engine.models.triton_ops import rms_norm
        layers, model = self.model.model.layers, self.model
        if piece == 0:
            x = model.model.embed_tokens(self._ids[:t])
            cos, sin = model.rotary.cos_sin(self._pos[:t], x.dtype)
            self._cos[:t].copy_(cos)
            self._sin[:t].copy_(sin)
            residual = None
        else:
            prev = layers[piece - 1]
            h = linear(self._attn[:t], prev.self_attn.o_proj)
            norm = prev.post_attention_layernorm
            h, residual = rms_norm(h, norm.weight, norm.eps, self._res[:t])
            x = prev.mlp.forward_fused(h)
        if piece == len(layers):
            norm = model.model.norm
            self._hidden[:t].copy_(rms_norm(x, norm.weight, norm.eps, residual)[0])
            return
        layer = layers[piece]
        norm = layer.input_layernorm
        h, residual = rms_norm(x, norm.weight, norm.eps, residual)
        q = layer.self_attn.project_rope_store(h, self._cos[:t], self._sin[:t], self._slots[:t], self.backend)
        self._q[:t].copy_(q)
        self._res[:t].copy_(residual)

    # --- replay ----------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final-norm hidden states [n, hidden] of a step of n = len(input_ids) tokens (a view
        of the static buffer: read it before the next step)."""
        n = input_ids.shape[0]
        t = self.buckets[bisect.bisect_left(self.buckets, n)]
        self._ids[:n].copy_(input_ids)
        self._pos[:n].copy_(positions)
        self._slots[:n].copy_(meta.slot_mapping)
        if n < t:
            self._slots[n:t].fill_(-1)  # padding rows store nothing
        graphs = self.graphs[t]
        graphs[0].replay()
        q, out = self._q[:n], self._attn[:n]
        for layer in range(len(graphs) - 1):
            self.backend.attend(layer, q, meta, out=out)
            graphs[layer + 1].replay()
        self.replays += 1
        return self._hidden[:n]


def capture_piecewise(model: LlamaForCausalLM, backend: AttentionBackend, device: torch.device,
                      max_tokens: int) -> Optional[PiecewiseGraphs]:
    """Piecewise graphs up to `max_tokens` tokens a step, or None where unsupported or off (0)."""
    if max_tokens <= 0 or not PiecewiseGraphs.supported(model, backend, device):
        return None
    graphs = PiecewiseGraphs(model, backend, device)
    return graphs if graphs.capture(piecewise_buckets(max_tokens)) else None
