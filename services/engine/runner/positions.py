"""A request's tokens and KV slots by position, read without building its whole token list.

Shared by the eager step (`model_runner`), the CUDA-graph step (`cuda_graph`) and pooling.
The eager step reads a prefill chunk's token ids as a slice of `prompt_array` (the prompt
as a numpy array, built once per request) and computes positions and KV slots for the whole
step with numpy (`step_positions`, `step_slots`): its host work is per sequence, not per token.
`context_slots` gives every sequence's context slots as views of one tensor (backends that
read context slots, the CPU one).
"""
from __future__ import annotations

from itertools import chain
from typing import Sequence

import numpy as np
import torch

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


def prompt_array(request: Request) -> np.ndarray:
    """The prompt's token ids as an int64 numpy array, built on first use and kept on the request
    (`Request.prompt_array`; prompts never change)."""
    array = request.prompt_array
    if array is None or len(array) != len(request.prompt_token_ids):
        array = request.prompt_array = np.asarray(request.prompt_token_ids, dtype=np.int64)
    return array


def token_array(request: Request, start: int, end: int) -> np.ndarray:
    """request.all_token_ids[start:end] as int64 numpy (a view of `prompt_array` inside the prompt)."""
    if end <= len(request.prompt_token_ids):
        return prompt_array(request)[start:end]
    return np.fromiter(token_slice(request, start, end), dtype=np.int64, count=end - start)


def step_positions(starts: Sequence[int], lens: Sequence[int], firsts: Sequence[int], count: int,
                   out: np.ndarray) -> np.ndarray:
    """Positions of a step's `count` flattened tokens into `out`: sequence i's rows firsts[i]..
    firsts[i] + lens[i] - 1 (contiguous, in order) hold positions starts[i]..; returns the
    sequence index of every row (None when every sequence has one token: row i is sequence i)."""
    if count == len(starts):
        out[:] = starts
        return None
    lens_np = np.asarray(lens, dtype=np.int64)
    seq_of_row = np.repeat(np.arange(len(lens_np)), lens_np)
    shift = np.asarray(starts, dtype=np.int64) - np.asarray(firsts, dtype=np.int64)
    np.add(np.arange(count, dtype=np.int64), shift[seq_of_row], out=out)
    return seq_of_row


def step_slots(positions: np.ndarray, seq_of_row, blocks: Sequence[int], block_base: Sequence[int],
               page: int, out: np.ndarray) -> None:
    """KV slots of a step's tokens into `out`: sequence i's position p lives in block
    blocks[block_base[i] + p // page] (`blocks`: the blocks under each sequence's new tokens,
    sequence after sequence; `block_base[i]`: where sequence i's block 0 would stand in it)."""
    base = np.asarray(block_base, dtype=np.int64)
    if seq_of_row is not None:
        base = base[seq_of_row]
    index = positions // page
    index += base
    np.asarray(blocks, dtype=np.int64).take(index, out=out)
    out *= page
    out += positions % page


def context_slots(tables: Sequence[Sequence[int]], context_lens: Sequence[int], page: int,
                  device: torch.device) -> list[torch.Tensor]:
    """Per sequence, the KV slot of every context position 0..context_lens[i]-1 through its block
    table `tables[i]` (at least ceil(len / page) blocks): views of one long tensor on `device`."""
    flat = np.fromiter(chain.from_iterable(tables), dtype=np.int64, count=sum(map(len, tables)))
    every = torch.from_numpy((flat[:, None] * page + np.arange(page, dtype=np.int64)).reshape(-1)).to(device)
    views, offset = [], 0
    for table, length in zip(tables, context_lens):
        views.append(every[offset:offset + length])
        offset += len(table) * page
    return views
