"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2) as plain modules.

Parameter names match Hugging Face's exactly (`model.layers.N.self_attn.q_proj.weight`,
...), so a safetensors state dict loads without renaming. Tokens of all sequences in a
step are flattened into one [tokens, hidden] batch; attention goes through the
`AttentionBackend` handed in with the step's metadata, which owns the paged KV cache.

`fused=True` (the GPU path) builds one QKV and one gate/up projection instead of the
separate ones (`hf_tensors` maps Hugging Face's names onto their row slices, so the same
safetensors load) and runs each layer through the Triton kernels of `triton_ops`: RMSNorm
fused with the residual add, RoPE fused with the KV-cache store, SiLU fused with the
multiply; the attention backend then reads every key from the cache (`backend.attend`).
At one token a step the projections (and the LM head) run as Triton GEMVs
(`models.gemv`), the down projection computing SiLU * up itself, wherever start-up tuning
(`models.gemv_tuning`) found them faster than cuBLAS on this GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baton.services.engine.attention.base import AttentionBackend, AttentionMetadata
from baton.services.engine.models.model_config import ModelConfig
from baton.services.engine.models.rotary import MRotaryEmbedding, RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (and Qwen3's per-head q/k norm)."""

    def __init__(self, cfg: ModelConfig, layer: int, fused: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_width, self.kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        if fused:
            self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_width + 2 * self.kv_width, bias=bias)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, self.q_width, bias=bias)
            self.k_proj = nn.Linear(cfg.hidden_size, self.kv_width, bias=bias)
            self.v_proj = nn.Linear(cfg.hidden_size, self.kv_width, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backend: AttentionBackend, meta: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(backend.forward(self.layer, q, k, v, meta))

    def forward_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      backend: AttentionBackend, meta: AttentionMetadata) -> torch.Tensor:
        from baton.services.engine.models.gemv import linear
        q = self.project_rope_store(x, cos, sin, meta.slot_mapping, backend)
        return linear(backend.attend(self.layer, q, meta), self.o_proj)

    def project_rope_store(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                           backend: AttentionBackend) -> torch.Tensor:
        """QKV projection (+ q/k norms), RoPE, K/V stored at `slots` of the cache; returns q
        [T, Hq, D] (the attention-free half of the fused attention, which piecewise graphs capture)."""
        from baton.services.engine.models.gemv import linear
        from baton.services.engine.models.triton_ops import rope_and_store
        tokens = x.shape[0]
        qkv = linear(x, self.qkv_proj)
        if self.qk_norm:
            q = self.q_norm(qkv[:, :self.q_width].view(tokens, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, self.q_width:self.q_width + self.kv_width].view(tokens, self.num_kv_heads,
                                                                                     self.head_dim))
            qkv[:, :self.q_width] = q.view(tokens, -1)
            qkv[:, self.q_width:self.q_width + self.kv_width] = k.view(tokens, -1)
        cache = backend.kv_cache
        scales = (cache.k_scale[self.layer], cache.v_scale[self.layer]) if cache.k_scale is not None else (None, None)
        return rope_and_store(qkv, cos, sin, slots, cache.keys[self.layer], cache.values[self.layer],
                              self.num_heads, self.num_kv_heads, self.head_dim, *scales)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, fused: bool = False) -> None:
        super().__init__()
        if fused:
            self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        else:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
            self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        from baton.services.engine.models.gemv import PRO_SILU_MUL, gemv, layer_config, linear, wants_gemv
        from baton.services.engine.models.triton_ops import silu_and_mul
        gate_up = linear(x, self.gate_up_proj)
        if wants_gemv(gate_up, self.down_proj):  # one token: SiLU * up inside the down GEMV
            return gemv(gate_up, self.down_proj.weight, PRO_SILU_MUL, config=layer_config(self.down_proj))
        return self.down_proj(silu_and_mul(gate_up))


class DecoderLayer(nn.Module):
    """Pre-norm attention block then pre-norm MLP block, each with a residual."""

    def __init__(self, cfg: ModelConfig, layer: int, fused: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer, fused)
        self.mlp = MLP(cfg, fused)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backend: AttentionBackend, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend, meta)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                      backend: AttentionBackend, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); the caller adds them."""
        from baton.services.engine.models.triton_ops import rms_norm
        norm = self.input_layernorm
        h, residual = rms_norm(x, norm.weight, norm.eps, residual)
        h = self.self_attn.forward_fused(h, cos, sin, backend, meta)
        norm = self.post_attention_layernorm
        h, residual = rms_norm(h, norm.weight, norm.eps, residual)
        return self.mlp.forward_fused(h), residual


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig, fused: bool = False) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, fused) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The whole causal LM: flattened token ids + positions in, hidden states out."""

    def __init__(self, cfg: ModelConfig, fused: bool = False) -> None:
        super().__init__()
        self.config = cfg
        self.fused = fused
        self.model = DecoderModel(cfg, fused)
        self.rotary = MRotaryEmbedding(cfg.rope, cfg.head_dim, cfg.mrope_section) if cfg.mrope_section \
            else RotaryEmbedding(cfg.rope, cfg.head_dim)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                backend: AttentionBackend, meta: AttentionMetadata,
                input_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                mrope_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [tokens, hidden] for every new token of the step.

        `input_embeds` (rows, embeddings): those rows take the given embeddings instead of their
        token's (image placeholders); `mrope_positions` [3, tokens]: multimodal rope positions."""
        x = self.model.embed_tokens(input_ids)
        if input_embeds is not None:
            x = x.index_copy(0, input_embeds[0], input_embeds[1].to(x.dtype))
        if mrope_positions is not None:
            cos, sin = self.rotary.cos_sin_3d(mrope_positions, x.dtype)
        else:
            cos, sin = self.rotary.cos_sin(positions, x.dtype)
        if self.fused:
            from baton.services.engine.models.triton_ops import rms_norm
            residual = None
            for layer in self.model.layers:
                x, residual = layer.forward_fused(x, residual, cos, sin, backend, meta)
            return rms_norm(x, self.model.norm.weight, self.model.norm.eps, residual)[0]
        for layer in self.model.layers:
            x = layer(x, cos, sin, backend, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] for the selected hidden states."""
        if self.fused:
            from baton.services.engine.models.gemv import linear
            return linear(hidden, self.lm_head)
        return self.lm_head(hidden)

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """Every Hugging Face tensor name -> the tensor (or, fused, the row slice) it loads into."""
        tensors = dict(self.named_parameters(remove_duplicate=False))
        if not self.fused:
            return tensors
        cfg = self.config
        for i, layer in enumerate(self.model.layers):
            prefix = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            q, kv = attn.q_width, attn.kv_width
            for kind in ("weight", "bias") if cfg.attention_bias else ("weight",):
                whole = tensors.pop(f"{prefix}self_attn.qkv_proj.{kind}")
                tensors[f"{prefix}self_attn.q_proj.{kind}"] = whole[:q]
                tensors[f"{prefix}self_attn.k_proj.{kind}"] = whole[q:q + kv]
                tensors[f"{prefix}self_attn.v_proj.{kind}"] = whole[q + kv:]
            whole = tensors.pop(f"{prefix}mlp.gate_up_proj.weight")
            tensors[f"{prefix}mlp.gate_proj.weight"] = whole[:cfg.intermediate_size]
            tensors[f"{prefix}mlp.up_proj.weight"] = whole[cfg.intermediate_size:]
        return tensors
