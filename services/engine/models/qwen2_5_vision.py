"""Qwen2.5-VL's vision transformer, as plain modules named like Hugging Face's (`visual.`).

Patches come from the image processor already cut and flattened ([patches, C * T * P * P],
ordered by 2x2 merge blocks); a 3-D convolution embeds them. Blocks are pre-RMSNorm
attention + SwiGLU MLP with 2-D rotary positions (row, column of each patch). Most blocks
attend within windows of `window_size` pixels (patches reordered window by window), the
`fullatt_block_indexes` ones across the whole image; the merger then folds each 2x2 block
of patches into one language-model embedding and the window order is undone.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from baton.services.engine.models.rotary import rotate_half


class VisionRMSNorm(nn.Module):
    """RMSNorm computed in float32 (Qwen2_5_VLRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class PatchEmbed(nn.Module):
    """Conv3d over (temporal, row, column) patches."""

    def __init__(self, patch: int, temporal: int, channels: int, dim: int) -> None:
        super().__init__()
        self.shape = (-1, channels, temporal, patch, patch)
        self.dim = dim
        self.proj = nn.Conv3d(channels, dim, kernel_size=(temporal, patch, patch),
                              stride=(temporal, patch, patch), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.view(self.shape).to(self.proj.weight.dtype)).view(-1, self.dim)


class VisionAttention(nn.Module):
    """Bidirectional attention inside each segment of `cu_seqlens`, with 2-D rotary q/k."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        c, s = cos[:, None].float(), sin[:, None].float()
        q = (q.float() * c + rotate_half(q.float()) * s).to(x.dtype)
        k = (k.float() * c + rotate_half(k.float()) * s).to(x.dtype)
        out = torch.empty_like(q)
        for lo, hi in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            qs, ks, vs = (t[lo:hi].transpose(0, 1)[None] for t in (q, k, v))
            out[lo:hi] = F.scaled_dot_product_attention(qs, ks, vs, scale=self.head_dim ** -0.5)[0].transpose(0, 1)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    """Pre-norm attention then pre-norm MLP."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = VisionRMSNorm(dim), VisionRMSNorm(dim)
        self.attn = VisionAttention(dim, heads)
        self.mlp = VisionMLP(dim, hidden)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each merge block of patches (concatenated) through a GELU MLP."""

    def __init__(self, out_dim: int, dim: int, merge: int) -> None:
        super().__init__()
        self.width = dim * merge * merge
        self.ln_q = VisionRMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


class Qwen25VisionTransformer(nn.Module):
    """Patches [patches, C*T*P*P] + grids [(t, h, w)] -> embeddings [patches / merge^2, out_hidden]."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        dim, heads = cfg["hidden_size"], cfg["num_heads"]
        self.merge, self.patch_size = cfg.get("spatial_merge_size", 2), cfg.get("patch_size", 14)
        self.window_size = cfg.get("window_size", 112)
        self.full_blocks = set(cfg.get("fullatt_block_indexes", []))
        rope = cfg.get("rope_parameters") or {}
        self.rope_theta = float(rope.get("rope_theta", 10000.0))
        self.rope_dim = (dim // heads) // 2
        self.patch_embed = PatchEmbed(self.patch_size, cfg.get("temporal_patch_size", 2), cfg.get("in_channels", 3),
                                      dim)
        self.blocks = nn.ModuleList(VisionBlock(dim, heads, cfg["intermediate_size"]) for _ in range(cfg["depth"]))
        self.merger = PatchMerger(cfg["out_hidden_size"], dim, self.merge)

    def _inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.rope_theta ** (torch.arange(0, self.rope_dim, 2, dtype=torch.float) / self.rope_dim))

    def _positions(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """(row, column) of every patch [patches, 2], in the processor's merge-block order."""
        m, out = self.merge, []
        for t, h, w in grids:
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            shape = (h // m, m, w // m, m)
            rows, cols = rows.reshape(shape).transpose(1, 2).flatten(), cols.reshape(shape).transpose(1, 2).flatten()
            out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
        return torch.cat(out)

    def _windows(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[int]]:
        """The merge-block order window by window, and the windows' cumulative patch counts."""
        m, side = self.merge, self.window_size // self.merge // self.patch_size
        index, cu, base = [], [0], 0
        for t, h, w in grids:
            gh, gw = h // m, w // m
            grid = torch.arange(t * gh * gw).reshape(t, gh, gw)
            pad_h, pad_w = side - gh % side, side - gw % side
            nh, nw = (gh + pad_h) // side, (gw + pad_w) // side
            padded = F.pad(grid, (0, pad_w, 0, pad_h), "constant", -100)
            padded = padded.reshape(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, side, side)
            sizes = (padded != -100).sum([2, 3]).reshape(-1)
            flat = padded.reshape(-1)
            index.append(flat[flat != -100] + base)
            for total in (sizes.cumsum(0) * m * m + cu[-1]).tolist():
                if total != cu[-1]:
                    cu.append(int(total))
            base += t * gh * gw
        return torch.cat(index), cu

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        device, unit = patches.device, self.merge * self.merge
        x = self.patch_embed(patches)
        n = x.shape[0]
        window_index, cu_windows = self._windows(grids)
        window_index = window_index.to(device)
        x = x.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)
        freqs = self._positions(grids).to(device)[..., None].float() * self._inv_freq().to(device)
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        freqs = freqs.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        cu_full = [0]
        for t, h, w in grids:
            for _ in range(t):
                cu_full.append(cu_full[-1] + h * w)
        for i, block in enumerate(self.blocks):
            x = block(x, cu_full if i in self.full_blocks else cu_windows, cos, sin)
        return self.merger(x)[torch.argsort(window_index)]
