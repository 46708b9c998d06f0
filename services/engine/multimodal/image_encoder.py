"""Images in, projected embeddings out: the image processor and the vision modules of a VLM folder.

Owns decoding image bytes (pillow; bad or oversized images are a ValueError), the folder's
Hugging Face image processor (CLIPImageProcessor for LLaVA, Qwen2VLImageProcessor for
Qwen2.5-VL: the very pixel values transformers computes), the content hash (sha256 of the
bytes), batching images through the tower and projector, and expanding a prompt's image
placeholders to one token per embedding (`expand_prompt`). The encoder service runs one;
a worker without encoders (the colocated baseline) runs its own.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from baton.services.engine.models.model_config import ModelConfig
from baton.services.engine.multimodal.inputs import ImageSpan


@dataclass
class PreparedImage:
    """One decoded, preprocessed image."""

    content_hash: str
    """sha256 hex digest of the image's bytes."""
    pixel_values: torch.Tensor
    """LLaVA: [3, H, W]; Qwen2.5-VL: [patches, C * T * P * P]."""
    grid: Optional[tuple[int, int, int]]
    """Qwen2.5-VL's patch grid (t, h, w); None for LLaVA."""
    num_tokens: int
    """Placeholder tokens (= embeddings) the image fills."""


def content_hash(data: bytes) -> str:
    """The hash every cache keys an image on."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, max_pixels: int = 64 * 1024 * 1024):
    """A PIL RGB image from encoded bytes; ValueError when they are not a decodable image."""
    from PIL import Image
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ValueError(f"the image has {image.width}x{image.height} pixels; at most {max_pixels} are taken")
        image.load()
    except ValueError:
        raise
    except Exception as exc:  # PIL raises many types for bad data
        raise ValueError(f"the image cannot be decoded: {exc}") from None
    return image.convert("RGB")


class ImageEncoder:
    """A VLM folder's image processor + vision tower + projector."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoImageProcessor

        from baton.services.engine.models.vlm import read_config
        self.folder = Path(folder)
        self.model_config = ModelConfig.from_folder(self.folder)
        if self.model_config.multimodal is None:
            raise ValueError(f"{folder} is not a vision-language model")
        self.family = self.model_config.multimodal
        self.device, self.dtype = torch.device(device), dtype
        self.processor = AutoImageProcessor.from_pretrained(str(self.folder))
        vision = read_config(self.folder)["vision_config"]
        if self.family == "llava":
            strategy = read_config(self.folder).get("vision_feature_select_strategy", "default")
            self._llava_tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + (strategy == "full")
        self._merge = vision.get("spatial_merge_size", 2)
        self._vision: Optional[torch.nn.Module] = None
        self.images_encoded = 0
        """Images run through the tower since start (the embedding cache's misses)."""
        self.batches_run = 0
        """Tower calls since start."""

    @property
    def vision(self) -> torch.nn.Module:
        """The tower and projector, loaded on first use (a worker that only counts tokens never loads them)."""
        if self._vision is None:
            from baton.services.engine.models.vlm import load_vision
            self._vision = load_vision(self.folder, self.family, self.dtype, self.device)
        return self._vision

    def tokens_for(self, grid: Optional[Sequence[int]]) -> int:
        """Placeholder tokens of an image (Qwen2.5-VL: of its patch grid)."""
        if self.family == "llava":
            return self._llava_tokens
        t, h, w = grid
        return t * h * w // (self._merge * self._merge)

    @property
    def image_token_id(self) -> int:
        """The placeholder token."""
        return self.model_config.image_token_id

    @property
    def hidden_size(self) -> int:
        """Width of one embedding (the language model's)."""
        return self.model_config.hidden_size

    def prepare(self, data: bytes) -> PreparedImage:
        """Decode and preprocess one image's bytes; ValueError for a bad image."""
        image = decode_image(data)
        if self.family == "llava":
            pixels = self.processor(images=[image], return_tensors="pt")["pixel_values"][0]
            return PreparedImage(content_hash(data), pixels, None, self.tokens_for(None))
        out = self.processor(images=[image], return_tensors="pt")
        grid = tuple(int(v) for v in out["image_grid_thw"][0].tolist())
        return PreparedImage(content_hash(data), out["pixel_values"], grid, self.tokens_for(grid))

    def describe(self, data: bytes) -> PreparedImage:
        """What a prompt needs to know of an image (hash, token count, grid) without its pixel values
        where the family allows: LLaVA's count is fixed, so the bytes are only decoded (a bad image is
        still a ValueError) and the image processor (most of `prepare`'s time) is skipped; Qwen2.5-VL's
        grid depends on the processor's resize, so it runs in full."""
        if self.family != "llava":
            return self.prepare(data)
        decode_image(data)
        return PreparedImage(content_hash(data), torch.empty(0), None, self.tokens_for(None))

    def encode(self, images: Sequence[PreparedImage]) -> list[torch.Tensor]:
        """Embeddings [num_tokens, hidden] (on the CPU) of each image, the tower run once for the batch."""
        if not images:
            return []
        self.images_encoded += len(images)
        self.batches_run += 1
        dtype = next(self.vision.parameters()).dtype
        if self.family == "llava":
            pixels = torch.stack([i.pixel_values for i in images]).to(self.device, dtype)
            return [e.float().cpu() for e in self.vision(pixels)]
        patches = torch.cat([i.pixel_values for i in images]).to(self.device, dtype)
        return [e.float().cpu() for e in self.vision(patches, [i.grid for i in images])]

    def spans(self, prompt: Sequence[int], images: Sequence[PreparedImage],
              embeddings: Optional[Sequence[torch.Tensor]] = None) -> tuple[list[int], list[ImageSpan]]:
        """The prompt expanded (`expand_prompt`) and its image spans (with embeddings when given)."""
        expanded, offsets = expand_prompt(prompt, self.image_token_id, [i.num_tokens for i in images])
        spans = [ImageSpan(offset=o, length=i.num_tokens, content_hash=i.content_hash,
                           embeddings=None if embeddings is None else embeddings[k], grid=i.grid)
                 for k, (o, i) in enumerate(zip(offsets, images))]
        return expanded, spans


def expand_prompt(prompt: Sequence[int], image_token_id: int, counts: Sequence[int]) -> tuple[list[int], list[int]]:
    """(expanded prompt, offset of each image): each run of placeholder tokens is one image, in
    order; a single placeholder becomes that image's count of them, a run already that long stays.
    ValueError when runs and images disagree."""
    out: list[int] = []
    offsets: list[int] = []
    i, n = 0, len(prompt)
    while i < n:
        if prompt[i] != image_token_id:
            out.append(int(prompt[i]))
            i += 1
            continue
        j = i
        while j < n and prompt[j] == image_token_id:
            j += 1
        k = len(offsets)
        if k >= len(counts):
            raise ValueError(f"the prompt has more image placeholders than the {len(counts)} images given")
        if j - i not in (1, counts[k]):
            raise ValueError(f"image {k} fills {counts[k]} placeholder tokens; the prompt has a run of {j - i}")
        offsets.append(len(out))
        out.extend([image_token_id] * counts[k])
        i = j
    if len(offsets) != len(counts):
        raise ValueError(f"{len(counts)} images but {len(offsets)} image placeholders in the prompt")
    return out, offsets
