"""Resuming a completion another engine started (stream migration): `ResumedCompletion`, `replay`.

When a decode worker dies or drains mid-stream, the router re-submits the request to another
worker with the tokens each completion already sent to the client. Those tokens are OUTPUT
tokens, not prompt: the new engine must continue exactly where the old one stopped, so
`replay` brings a fresh `Request` to the state an unbroken run had after them:

- `output_token_ids` holds them: max_tokens / min_tokens count them, frequency and presence
  penalties count them as output (repetition penalty sees prompt + output either way), and
  the scheduler computes their KV like a preempted request's (prompt + output, prefix cache
  first);
- the grammar matcher accepts them, so a JSON schema / regex / EBNF continues mid-document;
- the detokenizer and stop-string checker are fed them, their text discarded (the client has
  it) but the checker's held-back tail kept, so text held for a partial stop string is
  emitted (or cut) exactly as the unbroken stream would;
- a seeded generator draws the one uniform per sampled token the old engine drew, so the
  next draw is the one an unbroken stream would make (on any device: the generator is CPU).

A completion that already finished (n > 1: its siblings go on) is not regenerated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from baton.services.engine.request import Request


@dataclass(frozen=True)
class ResumedCompletion:
    """What one completion (`index`) of a migrated request already produced."""

    index: int
    """Which of the request's n completions."""
    output_token_ids: tuple[int, ...] = ()
    """Tokens already generated (and sent to the client), in order."""
    finished: bool = False
    """True when this completion needs no more tokens (it is not regenerated)."""


def resume_by_index(resume: Optional[Sequence[ResumedCompletion]], n: int,
                    vocab_size: int) -> dict[int, ResumedCompletion]:
    """The resume entries keyed by completion index; ValueError for a malformed list."""
    by_index: dict[int, ResumedCompletion] = {}
    for entry in resume or ():
        if not 0 <= entry.index < n:
            raise ValueError(f"resume: completion index {entry.index} is outside [0, {n})")
        if entry.index in by_index:
            raise ValueError(f"resume: completion index {entry.index} appears twice")
        bad = [t for t in entry.output_token_ids if t < 0 or t >= vocab_size]
        if bad:
            raise ValueError(f"resume: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        by_index[entry.index] = entry
    if by_index and all(e.finished for e in by_index.values()) and len(by_index) == n:
        raise ValueError("resume: every completion is already finished")
    return by_index


def replay(request: Request, tokens: Sequence[int]) -> None:
    """Bring a fresh request (no output yet) to the state after generating `tokens`."""
    tokens = [int(t) for t in tokens]
    if not tokens:
        return
    grammar = request.grammar
    if grammar is not None:
        for position, token in enumerate(tokens):
            if not grammar.accept(token):
                raise ValueError(f"resume: output token {position} ({token}) does not match the request's "
                                 f"structured-output constraint")
    if request.detokenizer is not None:
        text = []
        for token in tokens:
            emitted, stopped = request.stop_checker.feed(request.detokenizer.add(token))
            text.append(emitted)
            if stopped:
                raise ValueError("resume: the output already ends in a stop string")
        request.text_parts = [part for part in text if part]
    request.output_token_ids = tokens
    advance_generator(request.generator, len(tokens) if not request.params.greedy else 0)


def advance_generator(generator: Optional[torch.Generator], draws: int) -> None:
    """Consume `draws` uniforms from a request's generator, one at a time as `Sampler` draws them."""
    if generator is None:
        return
    for _ in range(draws):
        torch.rand(1, generator=generator, dtype=torch.float64, device=generator.device)
