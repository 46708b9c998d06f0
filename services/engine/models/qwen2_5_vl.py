"""Qwen2.5-VL: its vision side and the decoder's multimodal rope positions.

The decoder is Qwen2's (`models/llama.py` with q/k/v biases) with one difference: rotary
positions are three-dimensional (temporal, row, column; `mrope_section` says which rotary
pairs read which). Text tokens have all three equal to their running position; an image's
tokens take (start, start + row, start + column) over the merged grid, and the text after
it resumes at start + max(rows, columns). `mrope_positions` computes the prompt's table
and the delta that later (generated) tokens add to their index, as transformers'
`get_rope_index`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from baton.services.engine.models.qwen2_5_vision import Qwen25VisionTransformer


class Qwen25VLVision(nn.Module):
    """The vision transformer and merger, named as the checkpoint's (`visual.`)."""

    def __init__(self, raw: dict[str, Any]) -> None:
        super().__init__()
        self.visual = Qwen25VisionTransformer(raw["vision_config"])

    def init_buffers(self) -> None:
        """Nothing to recompute after loading (frequencies are computed per call)."""

    @property
    def merge(self) -> int:
        """Patches per side folded into one embedding."""
        return self.visual.merge

    def tokens_for_grid(self, grid: Sequence[int]) -> int:
        """Placeholder tokens of an image whose patch grid is (t, h, w)."""
        t, h, w = grid
        return t * h * w // (self.merge * self.merge)

    @torch.inference_mode()
    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """One embedding tensor [tokens, text hidden] per image, from the images' patches (concatenated)."""
        out = self.visual(patches, grids)
        return list(torch.split(out, [self.tokens_for_grid(g) for g in grids]))


def mrope_positions(num_tokens: int, spans: Sequence[tuple[int, int, tuple[int, int, int]]],
                    merge: int) -> tuple[torch.Tensor, int]:
    """(positions [3, num_tokens] long, delta) for a prompt whose image spans are (offset, length, grid)."""
    rows: list[torch.Tensor] = []
    pos = current = 0
    for offset, length, (t, h, w) in sorted(spans):
        if offset > pos:
            rows.append(torch.arange(offset - pos).view(1, -1).expand(3, -1) + current)
            current += offset - pos
        gt, gh, gw = t, h // merge, w // merge
        if gt * gh * gw != length:
            raise ValueError(f"image span of {length} tokens does not match its grid {(t, h, w)}")
        tt, hh, ww = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
        rows.append(torch.stack([tt, hh, ww]).reshape(3, -1) + current)
        current += max(gh, gw)
        pos = offset + length
    if num_tokens > pos:
        rows.append(torch.arange(num_tokens - pos).view(1, -1).expand(3, -1) + current)
    table = torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)
    delta = int(table.max()) + 1 - num_tokens if num_tokens else 0
    return table.long(), delta
