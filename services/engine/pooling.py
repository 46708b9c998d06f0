"""Embeddings from the served decoder model: one forward pass per prompt, its final-norm
hidden states pooled into one vector (what `/v1/embeddings` serves).

`embed(engine, prompts, pooling, normalize)` runs on the engine's own thread, between steps,
like any other engine call (an input longer than the engine's prefill chunk runs in chunks, as a
prefill does): each prompt gets scratch KV blocks from the engine's pool for the
pass (attention writes its keys and values there) and gives them back before returning, so the
scheduler never sees them and nothing enters the prefix cache. A prompt that does not fit the
context or a bad token id is a `ValueError`; blocks the pool cannot spare now (after evicting
unused cached prefixes) an `EmbedCapacityError` (the worker answers OVERLOADED: retry later).

Pooling, as vLLM's pooling runner for decoder models: `last` (default: the last token's hidden
state, which has attended to the whole prompt) or `mean` (the average over every token), then
L2-normalized unless `normalize` is False (vLLM normalizes embeddings by default).
"""
from __future__ import annotations

from typing import Sequence

import torch

from baton.services.engine.attention.base import AttentionMetadata, SequenceSlice
from baton.services.engine.runner.positions import slot_range

POOLING_TYPES = ("last", "mean")
"""The pooling methods `embed` knows; the first is the default."""


class EmbedCapacityError(ValueError):
    """The KV pool cannot spare the scratch blocks one prompt's pass needs right now."""


def validate(engine, prompts: Sequence[Sequence[int]], pooling: str) -> None:
    """Refuse a bad embedding request before it holds anything (ValueError)."""
    if pooling not in POOLING_TYPES:
        raise ValueError(f"pooling must be one of {', '.join(POOLING_TYPES)}, not {pooling!r}")
    if not prompts:
        raise ValueError("give at least one input to embed")
    vocab = engine.model_config.vocab_size
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"input {i} is empty")
        if len(prompt) > engine.max_model_len:
            raise ValueError(f"input {i} has {len(prompt)} tokens, more than the context of "
                             f"{engine.max_model_len}")
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"input {i}: token id {bad[0]} is out of range [0, {vocab})")


def _chunk_size(engine) -> int:
    """Tokens per forward pass: the engine's prefill chunk and step budget bound activations."""
    config = engine.config
    return max(1, min(config.prefill_chunk, config.max_num_batched_tokens))


@torch.inference_mode()
def _embed_one(engine, prompt: list[int], pooling: str) -> torch.Tensor:
    runner, pool = engine.runner, engine.pool
    page = runner.page_size
    need = (len(prompt) + page - 1) // page
    if not pool.can_allocate(need):
        engine.cache.evict(need - pool.num_free)  # unused cached prefixes go first, as for a step
    if not pool.can_allocate(need):
        raise EmbedCapacityError(f"no KV-cache room now for a {len(prompt)}-token input; retry later")
    blocks = pool.allocate(need)
    try:
        device, n, chunk = runner.device, len(prompt), _chunk_size(engine)
        total: torch.Tensor | None = None
        last: torch.Tensor | None = None
        for start in range(0, n, chunk):  # a long input in chunks, each attending to the ones before
            end = min(n, start + chunk)
            ids = torch.tensor(prompt[start:end], dtype=torch.long, device=device)
            positions = torch.arange(start, end, dtype=torch.long, device=device)
            slots = torch.tensor(slot_range(blocks, start, end, page), dtype=torch.long, device=device)
            context = None
            if runner.backend.uses_context_slots:
                context = torch.tensor(slot_range(blocks, 0, end, page), dtype=torch.long, device=device)
            seq = SequenceSlice(query_start=0, query_len=end - start, prefix_len=start, context_slots=context)
            meta = AttentionMetadata(seqs=[seq], slot_mapping=slots, sliding_window=runner.sliding_window,
                                     block_tables=[blocks], page_size=page)
            hidden = runner.forward_hidden(ids, positions, meta).float()
            last = hidden[-1]
            part = hidden.sum(dim=0)
            total = part if total is None else total + part
        vector = last if pooling == "last" else total / n
        return vector.cpu()
    finally:
        pool.release(blocks)


def embed(engine, prompts: Sequence[Sequence[int]], pooling: str = "last",
          normalize: bool = True) -> list[list[float]]:
    """One embedding per prompt (float32 values as Python floats), in order."""
    validate(engine, prompts, pooling)
    vectors = []
    for prompt in prompts:
        vector = _embed_one(engine, [int(t) for t in prompt], pooling)
        if normalize:
            vector = torch.nn.functional.normalize(vector, p=2.0, dim=0)
        vectors.append(vector.tolist())
    return vectors
