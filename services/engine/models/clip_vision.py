"""The CLIP ViT vision tower (LLaVA-1.5's), as plain modules named like Hugging Face's.

Patch embedding (a stride-`patch` convolution), a learned class token and position table,
a pre-norm, then pre-norm transformer layers (full bidirectional attention, quick-GELU
MLP). `forward` returns the hidden states after a given number of layers, which is what
LLaVA reads (`vision_feature_layer`, usually the second to last).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def activation(name: str):
    """The activation function a Hugging Face config names."""
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name in ("gelu", "gelu_python"):
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu
    raise ValueError(f"unsupported activation {name!r}")


class ClipEmbeddings(nn.Module):
    """Class token + patch embeddings + learned positions."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        dim, patch = cfg["hidden_size"], cfg["patch_size"]
        self.image_size = cfg["image_size"]
        self.class_embedding = nn.Parameter(torch.empty(dim))
        self.patch_embedding = nn.Conv2d(cfg.get("num_channels", 3), dim, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding((self.image_size // patch) ** 2 + 1, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if height != self.image_size or width != self.image_size:
            raise ValueError(f"image of {height}x{width} pixels; this tower takes {self.image_size}x{self.image_size}")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixel_values.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class ClipAttention(nn.Module):
    """Multi-head bidirectional self-attention."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        dim = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.head_dim = dim // self.num_heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        shape = (batch, seq, self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class ClipMLP(nn.Module):
    """fc2(act(fc1(x)))."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.act = activation(cfg.get("hidden_act", "quick_gelu"))
        self.fc1 = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"])
        self.fc2 = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    """Pre-norm attention then pre-norm MLP, each with a residual."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        eps = cfg.get("layer_norm_eps", 1e-5)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg["hidden_size"], eps=eps)
        self.mlp = ClipMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg["hidden_size"], eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    """The layer stack (Hugging Face's `encoder.layers.N`)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(cfg["num_hidden_layers"]))


class ClipVisionTower(nn.Module):
    """CLIPVisionModel's vision transformer."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        eps = cfg.get("layer_norm_eps", 1e-5)
        self.num_layers = cfg["num_hidden_layers"]
        self.patch_size, self.image_size = cfg["patch_size"], cfg["image_size"]
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg["hidden_size"], eps=eps)
        self.encoder = ClipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg["hidden_size"], eps=eps)

    def hidden_states(self, pixel_values: torch.Tensor, wanted: set[int]) -> dict[int, torch.Tensor]:
        """Hidden states [batch, 1 + patches, dim] after each of the `wanted` layer counts
        (0: the embeddings after the pre-norm), running no layer past the deepest wanted."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        out = {0: x} if 0 in wanted else {}
        for i, layer in enumerate(self.encoder.layers[:max(wanted)]):
            x = layer(x)
            if i + 1 in wanted:
                out[i + 1] = x
        return out
