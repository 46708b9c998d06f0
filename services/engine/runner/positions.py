"""A request's tokens and KV slots by position, read without building its whole token list.

Shared by the eager step (`model_runner`) and the CUDA-graph step (`cuda_graph`), which
both flatten a step's sequences into plain Python ints every step.
"""
from __future__ import annotations

from typing import Sequence

from baton.services.engine.request import Request


def token_slice(request: Request, start: int, end: int) -> list[int]:
    """request.all_token_ids[start:end] without building the whole list."""
    prompt = request.prompt_token_ids
    p = len(prompt)
    if end <= p:
        return prompt[start:end]
    output = request.output_token_ids
    if start >= p:
        return output[start - p:end - p]
    return prompt[start:] + output[:end - p]


def token_at(request: Request, position: int) -> int:
    """request.all_token_ids[position]."""
    prompt = request.prompt_token_ids
    p = len(prompt)
    return prompt[position] if position < p else request.output_token_ids[position - p]


def slot_range(table: Sequence[int], start: int, end: int, page: int) -> list[int]:
    """KV slots of positions start..end-1 through a block table."""
    slots: list[int] = []
    pos = start
    while pos < end:
        offset = pos % page
        count = min(page - offset, end - pos)
        base = table[pos // page] * page + offset
        slots.extend(range(base, base + count))
        pos += count
    return slots
