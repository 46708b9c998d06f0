"""LLaVA-1.5's vision side: the CLIP tower and the two-layer MLP projector.

The language model is the ordinary Llama-family decoder (`models/llama.py`); what LLaVA
adds is here: pixel values [images, 3, H, W] -> the tower's hidden states at
`vision_feature_layer` (one index or several, concatenated), the class token dropped under
the "default" select strategy -> `multi_modal_projector` -> one embedding per image
placeholder token, [images, tokens, text hidden].
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from baton.services.engine.models.clip_vision import ClipVisionTower, activation


class LlavaProjector(nn.Module):
    """linear_2(act(linear_1(features)))."""

    def __init__(self, in_dim: int, out_dim: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVision(nn.Module):
    """Tower + projector, parameters named as the checkpoint's (`vision_tower.`, `multi_modal_projector.`)."""

    def __init__(self, raw: dict[str, Any]) -> None:
        super().__init__()
        vision, text = raw["vision_config"], raw["text_config"]
        if raw.get("vision_feature_select_strategy", "default") not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {raw['vision_feature_select_strategy']!r}")
        self.keep_cls = raw.get("vision_feature_select_strategy", "default") == "full"
        layers = raw.get("vision_feature_layer", -2)
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.vision_tower = ClipVisionTower(vision)
        self.multi_modal_projector = LlavaProjector(vision["hidden_size"] * len(self.feature_layers),
                                                    text["hidden_size"], raw.get("projector_hidden_act", "gelu"),
                                                    raw.get("multimodal_projector_bias", True))

    def init_buffers(self) -> None:
        """Nothing to recompute after loading (no non-persistent buffers)."""

    @property
    def tokens_per_image(self) -> int:
        """Placeholder tokens (and embeddings) of one image."""
        return (self.vision_tower.image_size // self.vision_tower.patch_size) ** 2 + (1 if self.keep_cls else 0)

    def _layer_count(self, index: int) -> int:
        total = self.vision_tower.num_layers + 1  # Hugging Face's hidden_states: embeddings, then each layer
        count = index + total if index < 0 else index
        if not 0 <= count < total:
            raise ValueError(f"vision_feature_layer {index} is outside the tower's {total} hidden states")
        return count

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected embeddings [images, tokens_per_image, text hidden] for pixel values [images, 3, H, W]."""
        counts = [self._layer_count(i) for i in self.feature_layers]
        states = self.vision_tower.hidden_states(pixel_values, set(counts))
        features = torch.cat([states[c] if self.keep_cls else states[c][:, 1:] for c in counts], dim=-1)
        return self.multi_modal_projector(features)
