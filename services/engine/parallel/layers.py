"""The tensor-parallel Llama: Megatron-style column / row-parallel layers over a `TPGroup`.

Each rank builds the plain Llama modules from a *shard config* (`shard_config`: its share of
the query heads, KV heads and MLP width), so every q / k / v and gate / up projection is
column-parallel by construction (its rows are this rank's heads / MLP columns, fused or not),
and o_proj / down_proj are row-parallel (their input columns are this rank's share). The only
new behaviour is where partial results meet:

- `TPAttention` / `TPMLP`: the Llama attention and MLP, with their output (o_proj / down_proj,
  partial sums over this rank's heads / columns) all-reduced;
- `VocabParallelEmbedding`: this rank's slice of the vocabulary rows; ids outside it give
  zeros, and the all-reduce sums the one rank that holds each id;
- `TPLlamaForCausalLM`: the model with those layers and a vocab-parallel LM head whose logits
  are all-gathered (every rank gets the whole [rows, vocab]; rank 0 samples).

`shard_tensor` cuts a full Hugging Face tensor into this rank's part by the same rules, so the
loader reads the same safetensors folder on every rank. The vocabulary is split in equal slices
of ceil(vocab / tp) rows (the last one zero-padded; padded logits are cut off after the gather).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from baton.services.engine.models.llama import MLP, Attention, LlamaForCausalLM
from baton.services.engine.models.model_config import ModelConfig
from baton.services.engine.parallel.group import TPGroup

COLUMN_PARALLEL = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                   "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                   "mlp.gate_proj.weight", "mlp.up_proj.weight")
"""Tensors split by rows (output features): each rank holds its heads / MLP columns."""
ROW_PARALLEL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
"""Tensors split by columns (input features); their outputs are all-reduced."""
VOCAB_PARALLEL = ("model.embed_tokens.weight", "lm_head.weight")
"""Tensors split by vocabulary rows, in slices of `vocab_slice` rows."""


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """ValueError unless the model's heads and MLP width split evenly over `tp` ranks."""
    if tp < 1:
        raise ValueError("tp_size must be at least 1")
    problems = [f"{what} ({value}) is not divisible by --tp {tp}"
                for what, value in (("num_attention_heads", cfg.num_heads), ("num_key_value_heads", cfg.num_kv_heads),
                                    ("intermediate_size", cfg.intermediate_size))
                if value % tp]
    if problems:
        raise ValueError("tensor parallelism splits heads and MLP columns evenly over the ranks: "
                         + "; ".join(problems))


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The shape of one rank's share: its query / KV heads and MLP width (the vocabulary stays whole:
    `config.vocab_size` is what the runner and sampler see)."""
    check_tp(cfg, tp)
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp,
                               intermediate_size=cfg.intermediate_size // tp)


def vocab_slice(vocab: int, tp: int) -> int:
    """Vocabulary rows per rank (the last rank's slice is zero-padded to it)."""
    return -(-vocab // tp)


def shard_tensor(name: str, tensor: torch.Tensor, rank: int, tp: int, vocab: int) -> torch.Tensor:
    """Rank `rank`'s part of the full Hugging Face tensor `name`."""
    if tp == 1:
        return tensor
    if name.endswith(COLUMN_PARALLEL):
        part = tensor.shape[0] // tp
        return tensor.narrow(0, rank * part, part)
    if name.endswith(ROW_PARALLEL):
        part = tensor.shape[1] // tp
        return tensor.narrow(1, rank * part, part)
    if name in VOCAB_PARALLEL:
        rows = vocab_slice(vocab, tp)
        start = rank * rows
        stop = min(vocab, start + rows)
        out = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
        if stop > start:
            out[:stop - start] = tensor[start:stop]
        return out
    return tensor  # norms (and Qwen3's q / k norms): replicated


class TPAttention(Attention):
    """Attention over this rank's heads; the o_proj partial sums are all-reduced."""

    group: TPGroup

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.group.all_reduce(super().forward(*args, **kwargs))

    def forward_fused(self, *args, **kwargs) -> torch.Tensor:
        return self.group.all_reduce(super().forward_fused(*args, **kwargs))


class TPMLP(MLP):
    """SwiGLU over this rank's MLP columns; the down_proj partial sums are all-reduced."""

    group: TPGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(super().forward(x))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(super().forward_fused(x))


class VocabParallelEmbedding(nn.Module):
    """This rank's slice of the embedding rows; the other ranks' ids give zeros before the all-reduce."""

    def __init__(self, vocab: int, hidden: int, group: TPGroup) -> None:
        super().__init__()
        self.rows = vocab_slice(vocab, group.size)
        self.start = group.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden))
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return self.group.all_reduce(out)


class TPLlamaForCausalLM(LlamaForCausalLM):
    """The Llama decoder over a TP group; built from `shard_config(cfg, group.size)`."""

    def __init__(self, cfg: ModelConfig, fused: bool, group: TPGroup) -> None:
        super().__init__(cfg, fused)
        self.group = group
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = _with_group(TPAttention(cfg, i, fused), group)
            layer.mlp = _with_group(TPMLP(cfg, fused), group)
        self.model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, group)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab_slice(cfg.vocab_size, group.size), bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every rank's vocabulary slice of the logits, gathered: [rows, vocab] on every rank."""
        local = super().compute_logits(hidden)
        return self.group.all_gather_last(local)[:, :self.config.vocab_size]


def _with_group(module: nn.Module, group: TPGroup) -> nn.Module:
    object.__setattr__(module, "group", group)  # not a submodule, not a parameter
    return module
