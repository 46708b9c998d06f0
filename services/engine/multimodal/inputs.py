"""A request's images as the engine sees them: spans of placeholder tokens with their embeddings.

The prompt arrives expanded (one placeholder token per image embedding). Each `ImageSpan`
names where its placeholders stand, the image's content hash and its projected embeddings
[length, hidden]; Qwen2.5-VL spans also carry the patch grid for the multimodal rope.
`MultimodalState` (on `Request.multimodal`) is what the runner and the scheduler read:
the spans, the prompt's prefix-cache key and, for a multimodal-rope model, the position
table and delta.

The prefix-cache key is the prompt with every placeholder replaced by a pseudo id derived
from its image's hash (negative, so never a real token): two different images behind the
same placeholder tokens never share cached blocks past the image, and the same image in
the same place does (SGLang pads the placeholder ids with the hash for the same reason).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from baton.services.engine.models.model_config import ModelConfig


@dataclass
class ImageSpan:
    """One image's placeholder tokens in a prompt."""

    offset: int
    """Prompt position of its first placeholder token."""
    length: int
    """Placeholder tokens (= embeddings)."""
    content_hash: str
    """Hex digest of the image's bytes (what the embedding cache and the prefix cache key on)."""
    embeddings: Optional[torch.Tensor] = None
    """Projected embeddings [length, hidden]; None until they arrive (an encoder's transfer)."""
    grid: Optional[tuple[int, int, int]] = None
    """Patch grid (t, h, w) before merging (Qwen2.5-VL's multimodal rope); None for LLaVA."""


@dataclass
class MultimodalState:
    """What a request's images mean to the runner and the scheduler."""

    spans: list[ImageSpan]
    cache_key: list[int]
    """The prompt with each placeholder replaced by its image's pseudo id (the radix key)."""
    mrope_positions: Optional[torch.Tensor] = None
    """[3, prompt tokens] multimodal rope positions (Qwen2.5-VL); None otherwise."""
    mrope_delta: int = 0
    """What a position past the prompt adds to its index (multimodal rope)."""


def pseudo_token_id(content_hash: str) -> int:
    """The negative id that stands for an image's placeholders in the prefix-cache key."""
    return -(2 + int(content_hash[:15], 16))


def build_state(model: ModelConfig, prompt: Sequence[int], spans: Sequence[ImageSpan]) -> MultimodalState:
    """Validate the spans against the prompt and the model; raises ValueError for a bad request."""
    if model.multimodal is None:
        raise ValueError("this model takes no images")
    ordered = sorted(spans, key=lambda s: s.offset)
    key = list(prompt)
    end = 0
    for span in ordered:
        if span.length <= 0 or span.offset < end or span.offset + span.length > len(prompt):
            raise ValueError(f"image span at {span.offset} (+{span.length}) overlaps another or leaves the prompt")
        window = prompt[span.offset:span.offset + span.length]
        if any(t != model.image_token_id for t in window):
            raise ValueError(f"image span at {span.offset} does not cover image placeholder tokens "
                             f"({model.image_token_id})")
        if span.embeddings is not None and tuple(span.embeddings.shape) != (span.length, model.hidden_size):
            raise ValueError(f"image embeddings of shape {tuple(span.embeddings.shape)}; expected "
                             f"({span.length}, {model.hidden_size})")
        if not span.content_hash or any(c not in "0123456789abcdef" for c in span.content_hash[:15]):
            raise ValueError("an image span needs its content hash (hex)")
        key[span.offset:span.offset + span.length] = [pseudo_token_id(span.content_hash)] * span.length
        end = span.offset + span.length
    placeholders = sum(1 for t in prompt if t == model.image_token_id)
    if placeholders != sum(s.length for s in ordered):
        raise ValueError(f"the prompt has {placeholders} image placeholder tokens but its images fill "
                         f"{sum(s.length for s in ordered)}")
    state = MultimodalState(spans=list(ordered), cache_key=key)
    if model.mrope_section:
        if any(s.grid is None for s in ordered):
            raise ValueError("this model's image spans need their patch grid")
        from baton.services.engine.models.qwen2_5_vl import mrope_positions
        state.mrope_positions, state.mrope_delta = mrope_positions(
            len(prompt), [(s.offset, s.length, tuple(s.grid)) for s in ordered], _merge(ordered))
    return state


def missing_embeddings(state: MultimodalState) -> list[ImageSpan]:
    """The spans whose embeddings have not arrived yet."""
    return [s for s in state.spans if s.embeddings is None]


def _merge(spans: Sequence[ImageSpan]) -> int:
    """Patches per side merged into one embedding, read off the spans (t*h*w patches -> length tokens)."""
    merges = set()
    for span in spans:
        t, h, w = span.grid
        merge = math.isqrt(t * h * w // span.length)
        if merge * merge * span.length != t * h * w:
            raise ValueError(f"image span of {span.length} tokens does not match its grid {span.grid}")
        merges.add(merge)
    if len(merges) > 1:
        raise ValueError("image spans disagree on the merge size")
    return merges.pop() if merges else 1
