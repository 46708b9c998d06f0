"""`POST /v1/select` (a Baton extension): which of a few continuations the model finds most likely.

The frontend language's `select` (SGLang's) runs here, on the server:
1. the prefix (a text prompt, or chat messages rendered with the model's template, the choice
   starting the assistant's reply, or with `continue_final_message` continuing the final
   assistant message) and every
   prefix + choice are tokenized; the choices' tokens are those after the longest token
   prefix shared by the prefix alone and every prefix + choice (so a choice that merges
   with the prefix's last token at tokenization is scored on the merged token);
2. one scoring request per choice (prompt = prefix + choice, one token generated and dropped,
   prompt logprobs from the shared length on): the first runs alone and leaves the prefix
   in the decode worker's radix cache, the others then run together and reuse it (the
   prefix is prefilled once). Prompt-logprob requests go decode-only (router/decider.py);
3. each choice's score is the length-normalised log-probability of its tokens (their mean
   logprob, SGLang's `token_length_normalized`); the highest wins, ties to the first.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from baton.protos.baton.v1 import common_pb2
from baton.router.gateway.convert import render_chat, resolve_max_tokens
from baton.router.gateway.errors import invalid_request
from baton.router.gateway.responses import usage_dict
from baton.router.types import RouterCoreAPI, RouterRequest

MAX_CHOICES = 128


@dataclass
class ScoredChoice:
    """One choice's tokens after the shared prefix and their logprobs."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    prompt_tokens: int
    cached_tokens: int

    @property
    def score(self) -> float:
        """Mean logprob of the choice's tokens (length-normalised)."""
        return sum(self.logprobs) / len(self.logprobs)

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "text": self.text, "score": self.score, "logprob": sum(self.logprobs),
                "num_tokens": len(self.token_ids), "token_ids": self.token_ids, "token_logprobs": self.logprobs,
                "cached_tokens": self.cached_tokens}


def _common_prefix_len(sequences: list[list[int]]) -> int:
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        if any(s[i] != sequences[0][i] for s in sequences[1:]):
            return i
    return shortest


def choice_prompts(tokenizer, choices: list[str], *, prompt: Optional[str] = None,
                   messages: Optional[list[dict[str, Any]]] = None, continue_final_message: bool = False,
                   template_kwargs: Optional[dict[str, Any]] = None) -> tuple[list[list[int]], int]:
    """(prefix + choice token ids per choice, the shared length the choices' tokens start at).
    With messages a choice starts the assistant's reply, or with `continue_final_message`
    continues the final (assistant) message."""
    if not choices or len(choices) > MAX_CHOICES:
        raise invalid_request(f"give between 1 and {MAX_CHOICES} choices", param="choices")
    for i, choice in enumerate(choices):
        if not choice:
            raise invalid_request("choices must be non-empty strings", param=f"choices.{i}")
    if (prompt is None) == (messages is None):
        raise invalid_request("give exactly one of prompt and messages", param="prompt")
    if prompt is not None:
        if not prompt:
            raise invalid_request("the prompt must not be empty", param="prompt")
        prefix = list(tokenizer.encode(prompt))
        full = [list(tokenizer.encode(prompt + c)) for c in choices]
    else:
        if continue_final_message and (not messages or messages[-1]["role"] != "assistant"):
            raise invalid_request("continue_final_message needs the last message to be the assistant's",
                                  param="continue_final_message")
        head, last = (messages[:-1], messages[-1]) if continue_final_message else \
            (messages, {"role": "assistant", "content": ""})

        def render(text: str) -> list[int]:
            return render_chat([*head, {**last, "content": text}], tokenizer, continue_final_message=True,
                               template_kwargs=template_kwargs)
        prefix = render(last.get("content") or "")
        full = [render((last.get("content") or "") + c) for c in choices]
    shared = _common_prefix_len([prefix, *full])
    for i, ids in enumerate(full):
        if len(ids) <= shared:
            raise invalid_request(f"choice {i} ({choices[i]!r}) adds no token to the prompt", param=f"choices.{i}")
    return full, shared


async def _score(core: RouterCoreAPI, request_id: str, prompt: list[int], shared: int,
                 deadline: float) -> tuple[list[float], int]:
    """(logprobs of prompt[shared:], cached prompt tokens) from one scoring request."""
    params = common_pb2.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                       prompt_logprobs_start=shared)
    stream = core.open_stream(RouterRequest(request_id=request_id, prompt_token_ids=prompt, params=params,
                                            timeout_s=max(0.001, deadline - time.monotonic())))
    entries: list[common_pb2.TokenLogprob] = []
    cached = 0
    try:
        while (chunk := await stream.next()) is not None:
            entries.extend(chunk.prompt_logprobs)
            if chunk.usage is not None:
                cached = chunk.usage.cached_tokens
    finally:
        stream.close()
    wanted = len(prompt) - max(shared, 1)  # nothing predicts the very first token: it has no logprob
    if len(entries) != wanted:
        raise RuntimeError(f"scoring request {request_id} returned {len(entries)} prompt logprobs, not {wanted}")
    return [e.logprob for e in entries], cached


async def run_select(core: RouterCoreAPI, choices: list[str], full: list[list[int]], shared: int) -> dict[str, Any]:
    """Score every choice (the first alone, to cache the prefix, then the rest together); the response."""
    request_id = f"select-{uuid.uuid4().hex}"
    deadline = time.monotonic() + core.config.request_timeout_s
    for ids in full:
        resolve_max_tokens(1, len(ids), core.max_model_len, chat=False)
    first = await _score(core, f"{request_id}-0", full[0], shared, deadline)
    tasks = [asyncio.ensure_future(_score(core, f"{request_id}-{i}", ids, shared, deadline))
             for i, ids in enumerate(full) if i > 0]
    try:
        rest = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:  # one failed (or the client went away): abort the others
            task.cancel()
        raise
    scored = []
    for i, (logprobs, cached) in enumerate([first, *rest]):
        start = max(shared, 1)
        scored.append(ScoredChoice(index=i, text=choices[i], token_ids=full[i][start:], logprobs=logprobs,
                                   prompt_tokens=len(full[i]), cached_tokens=cached))
    best = max(scored, key=lambda c: (c.score, -c.index))
    return {"id": request_id, "object": "select", "created": int(time.time()), "model": core.model_name,
            "choices": [c.as_dict() for c in scored], "selected": best.index, "prefix_tokens": shared,
            "usage": usage_dict(sum(c.prompt_tokens for c in scored), 0, sum(c.cached_tokens for c in scored))}
