"""The image part of a step's inputs: which rows take image embeddings, and multimodal rope positions.

`ModelRunner.prepare` hands every scheduled item whose request has images
(`Request.multimodal`) to a `MultimodalStep`; `model_kwargs` then gives the model call its
`input_embeds` (flattened rows, embeddings) override for the placeholder positions of the
chunk and, for a multimodal-rope model (Qwen2.5-VL), `mrope_positions` [3, tokens] for the
whole step: a text-only request's rows repeat their position three times, an image
request's prompt rows read its table and its later rows add its delta.
"""
from __future__ import annotations

from typing import Any

import torch


class MultimodalStep:
    """Collects one step's image rows and positions."""

    def __init__(self, mrope: bool) -> None:
        self.mrope = mrope
        self.rows: list[int] = []
        self.embeds: list[torch.Tensor] = []
        self.positions: list[tuple[int, torch.Tensor]] = []
        """(first row, [3, n] positions) of each image request's tokens (multimodal rope)."""

    def add(self, state: Any, start: int, end: int, first_row: int, prompt_len: int) -> None:
        """Positions start..end-1 of a request with images are rows first_row.. of the step."""
        for span in state.spans:
            lo, hi = max(start, span.offset), min(end, span.offset + span.length)
            if lo >= hi:
                continue
            if span.embeddings is None:
                raise RuntimeError(f"image at {span.offset} is scheduled before its embeddings arrived")
            self.rows.extend(range(first_row + lo - start, first_row + hi - start))
            self.embeds.append(span.embeddings[lo - span.offset:hi - span.offset])
        if self.mrope and state.mrope_positions is not None:
            table = state.mrope_positions
            inside = table[:, start:min(end, prompt_len)]
            beyond = max(0, end - max(start, prompt_len))
            if beyond:
                later = torch.arange(max(start, prompt_len), end).view(1, -1).expand(3, -1) + state.mrope_delta
                inside = torch.cat([inside, later], dim=1)
            self.positions.append((first_row, inside))

    def model_kwargs(self, positions: torch.Tensor, device: torch.device) -> dict[str, Any]:
        """The extra keyword arguments of the model call (empty for a text-only step)."""
        kwargs: dict[str, Any] = {}
        if self.rows:
            embeds = torch.cat([e.to(device) for e in self.embeds])
            kwargs["input_embeds"] = (torch.tensor(self.rows, dtype=torch.long, device=device), embeds)
        if self.positions:
            table = positions.view(1, -1).repeat(3, 1)
            for first, rows in self.positions:
                table[:, first:first + rows.shape[1]] = rows.to(table.device)
            kwargs["mrope_positions"] = table
        return kwargs
