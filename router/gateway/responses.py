"""Router `Chunk`s -> OpenAI response objects (plain dicts, ready for JSON).

Non-streaming: a `Collector` gathers every chunk of a request (all `n` choices) and builds a
`chat.completion` or `text_completion` object. Streaming: `ChatStream` / `CompletionStream`
turn each chunk into a `chat.completion.chunk` / `text_completion` chunk (the chat delta
carries `role` on the first chunk of each choice) and, when `stream_options.include_usage`,
build the extra final chunk with `choices: []` and the usage (every other chunk then has
`"usage": null`, as OpenAI does).

Usage: `prompt_tokens`, the sum of the choices' `completion_tokens`, `total_tokens` and
`prompt_tokens_details.cached_tokens`, taken from the `Usage` on each choice's final chunk
(token counts seen in the chunks stand in when a choice ended without one). `stop_reason`
(the stop string or token that ended a choice, vLLM's extension) rides along on each choice.

Streamed events: `event(chunk)` is the SSE bytes of `chunk(chunk)` (None when nothing is sent).
The common chunk (no logprobs, no per-chunk usage, not a choice's first or last chunk) is written
from a per-stream template instead of a dict and a JSON encoding: the same bytes, a fraction of
the CPU (the gateway relays thousands of these a second).

Echo (completions): every choice starts with the prompt's text and, with logprobs, the prompt
tokens' logprobs (from the prompt logprobs on the choice's first chunk); with `max_tokens: 0`
the token generated is dropped and the usage counts no completion tokens.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from baton.protos.baton.v1 import common_pb2
from baton.router.gateway.convert import EchoPrompt
from baton.router.gateway.logprobs import (CompletionLogprobs, TokenStrings, chat_logprobs,
                                           join_completion_logprobs)
from baton.router.gateway.sse import compact_json, json_str, sse
from baton.router.types import Chunk


@dataclass
class ResponseContext:
    """Per-request facts every response object repeats."""

    request_id: str
    model: str
    prompt_tokens: int
    strings: TokenStrings
    n: int = 1
    logprobs: bool = False
    """Whether the request asked for logprobs (else `logprobs` is null)."""
    include_usage: bool = False
    continuous_usage: bool = False
    """Every streamed chunk carries the usage so far (stream_options.continuous_usage_stats)."""
    echo: Optional[EchoPrompt] = None
    """Completions with `echo`: the prompt each choice starts with."""
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def echo_only(self) -> bool:
        """`echo` with `max_tokens: 0`: the completion itself is dropped."""
        return self.echo is not None and self.echo.only


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class UsageTracker:
    """The request's usage over all its choices."""

    def __init__(self, prompt_tokens: int, count_completion: bool = True) -> None:
        self._prompt_tokens = prompt_tokens
        self._count_completion = count_completion
        self._counted: dict[int, int] = {}
        self._final: dict[int, common_pb2.Usage] = {}

    def add(self, chunk: Chunk) -> None:
        self._counted[chunk.index] = self._counted.get(chunk.index, 0) + len(chunk.token_ids)
        if chunk.usage is not None:
            self._final[chunk.index] = chunk.usage

    def as_dict(self) -> dict[str, Any]:
        indices = set(self._counted) | set(self._final)
        completion = sum(
            self._final[i].completion_tokens if i in self._final else self._counted.get(i, 0) for i in indices)
        if not self._count_completion:
            completion = 0
        prompt = max((u.prompt_tokens for u in self._final.values()), default=0) or self._prompt_tokens
        cached = max((u.cached_tokens for u in self._final.values()), default=0)
        return usage_dict(prompt, completion, cached)


@dataclass
class _Choice:
    texts: list[str] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Optional[str] = None


def _stop_reason(chunk: Chunk) -> Optional[str]:
    return chunk.stop_reason or None


class Collector:
    """Gathers a whole request's chunks for a non-streaming response."""

    def __init__(self, ctx: ResponseContext) -> None:
        self.ctx = ctx
        self.usage = UsageTracker(ctx.prompt_tokens, count_completion=not ctx.echo_only)
        self._choices: dict[int, _Choice] = {i: _Choice() for i in range(ctx.n)}

    def add(self, chunk: Chunk) -> None:
        choice = self._choices.setdefault(chunk.index, _Choice())
        choice.prompt_logprobs.extend(chunk.prompt_logprobs)
        if not self.ctx.echo_only:
            choice.texts.append(chunk.text)
            choice.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            choice.finish_reason = chunk.finish_reason
            choice.stop_reason = _stop_reason(chunk)
        self.usage.add(chunk)

    def _sorted(self) -> list[tuple[int, _Choice]]:
        return sorted(self._choices.items())

    def chat_completion(self) -> dict[str, Any]:
        """The `chat.completion` object."""
        ctx = self.ctx
        choices = [{
            "index": index,
            "message": {"role": "assistant", "content": "".join(choice.texts)},
            "logprobs": chat_logprobs(choice.logprobs, ctx.strings) if ctx.logprobs else None,
            "finish_reason": choice.finish_reason or "abort",
            "stop_reason": choice.stop_reason,
        } for index, choice in self._sorted()]
        return {"id": ctx.request_id, "object": "chat.completion", "created": ctx.created,
                "model": ctx.model, "choices": choices, "usage": self.usage.as_dict()}

    def text_completion(self) -> dict[str, Any]:
        """The `text_completion` object."""
        ctx = self.ctx
        choices = []
        for index, choice in self._sorted():
            logprobs = None
            if ctx.logprobs:
                state = CompletionLogprobs(ctx.strings)
                prompt = state.add_prompt(ctx.echo.token_ids, choice.prompt_logprobs) if ctx.echo else None
                logprobs = state.add(choice.logprobs)
                if prompt is not None:
                    logprobs = join_completion_logprobs(prompt, logprobs)
            choices.append({
                "index": index,
                "text": (ctx.echo.text if ctx.echo else "") + "".join(choice.texts),
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason or "abort",
                "stop_reason": choice.stop_reason,
            })
        return {"id": ctx.request_id, "object": "text_completion", "created": ctx.created,
                "model": ctx.model, "choices": choices, "usage": self.usage.as_dict()}


class _Stream:
    object_name = ""

    def __init__(self, ctx: ResponseContext) -> None:
        self.ctx = ctx
        self.usage = UsageTracker(ctx.prompt_tokens, count_completion=not ctx.echo_only)
        head = compact_json({"id": ctx.request_id, "object": self.object_name, "created": ctx.created,
                             "model": ctx.model})
        self._head = f'data: {head[:-1]},"choices":['
        """What `sse(self._envelope([choice]))` writes before the choice..."""
        self._tail = '],"usage":null}\n\n' if ctx.include_usage else "]}\n\n"
        """... and after it (when the usage is not continuous)."""

    def chunk(self, chunk: Chunk) -> Optional[dict[str, Any]]:
        raise NotImplementedError

    def event(self, chunk: Chunk) -> Optional[bytes]:
        """The SSE event of one router chunk (`chunk(chunk)` encoded), or None when there is nothing to send."""
        obj = self.chunk(chunk)
        return None if obj is None else sse(obj)

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = {"id": self.ctx.request_id, "object": self.object_name, "created": self.ctx.created,
               "model": self.ctx.model, "choices": choices}
        if self.ctx.include_usage:
            obj["usage"] = self.usage.as_dict() if self.ctx.continuous_usage and choices else None
        return obj

    def _template_tail(self, text: str) -> Optional[str]:
        """What follows a templated choice: the usage so far when continuous, else the fixed tail;
        None when there is no event (no text and no continuous usage: `_skip`'s rule)."""
        if not self.ctx.continuous_usage:
            return self._tail if text else None
        if not self.ctx.include_usage:
            return self._tail
        u = self.usage.as_dict()
        return (f'],"usage":{{"prompt_tokens":{u["prompt_tokens"]},"completion_tokens":{u["completion_tokens"]},'
                f'"total_tokens":{u["total_tokens"]},"prompt_tokens_details":'
                f'{{"cached_tokens":{u["prompt_tokens_details"]["cached_tokens"]}}}}}}}\n\n')

    def _skip(self, chunk: Chunk) -> bool:
        """Nothing to tell the client: no text, not final, no logprobs to report, and no
        per-chunk usage asked for (with continuous usage every engine step is an event)."""
        return (not chunk.text and chunk.finish_reason is None and not (self.ctx.logprobs and chunk.logprobs)
                and not self.ctx.continuous_usage)

    def usage_chunk(self) -> Optional[dict[str, Any]]:
        """The extra last chunk (`choices: []`, the usage) when include_usage, else None."""
        if not self.ctx.include_usage:
            return None
        obj = self._envelope([])
        obj["usage"] = self.usage.as_dict()
        return obj


class ChatStream(_Stream):
    """`chat.completion.chunk` objects for a streamed chat request."""

    object_name = "chat.completion.chunk"

    def __init__(self, ctx: ResponseContext) -> None:
        super().__init__(ctx)
        self._started: set[int] = set()
        self._plain = type(self).chunk is ChatStream.chunk and not ctx.logprobs
        """Whether `event` may use the template (a subclass that rewrites chunks never does)."""

    def event(self, chunk: Chunk) -> Optional[bytes]:
        if self._plain and chunk.finish_reason is None and chunk.index in self._started:
            self.usage.add(chunk)
            tail = self._template_tail(chunk.text)
            if tail is None:
                return None
            return (f'{self._head}{{"index":{chunk.index},"delta":{{"content":{json_str(chunk.text)}}},'
                    f'"logprobs":null,"finish_reason":null}}{tail}').encode()
        return super().event(chunk)

    def chunk(self, chunk: Chunk) -> Optional[dict[str, Any]]:
        """The chunk object for one router chunk, or None when there is nothing to send."""
        self.usage.add(chunk)
        if self._skip(chunk):
            return None
        delta: dict[str, Any] = {}
        if chunk.index not in self._started:
            self._started.add(chunk.index)
            delta["role"] = "assistant"
        delta["content"] = chunk.text
        choice = {
            "index": chunk.index,
            "delta": delta,
            "logprobs": chat_logprobs(chunk.logprobs, self.ctx.strings) if self.ctx.logprobs else None,
            "finish_reason": chunk.finish_reason,
        }
        if chunk.finish_reason is not None:
            choice["stop_reason"] = _stop_reason(chunk)
        return self._envelope([choice])


class CompletionStream(_Stream):
    """`text_completion` chunk objects for a streamed completions request."""

    object_name = "text_completion"

    def __init__(self, ctx: ResponseContext) -> None:
        super().__init__(ctx)
        self._logprobs: dict[int, CompletionLogprobs] = {}
        self._plain = type(self).chunk is CompletionStream.chunk and not ctx.logprobs and not ctx.echo_only
        """Whether `event` may use the template (echo only changes a choice's first chunk)."""

    def event(self, chunk: Chunk) -> Optional[bytes]:
        if self._plain and chunk.finish_reason is None and chunk.index in self._logprobs:
            self.usage.add(chunk)
            tail = self._template_tail(chunk.text)
            if tail is None:
                return None
            return (f'{self._head}{{"index":{chunk.index},"text":{json_str(chunk.text)},'
                    f'"logprobs":null,"finish_reason":null}}{tail}').encode()
        return super().event(chunk)

    def chunk(self, chunk: Chunk) -> Optional[dict[str, Any]]:
        """The chunk object for one router chunk, or None when there is nothing to send."""
        self.usage.add(chunk)
        echo = self.ctx.echo
        first = chunk.index not in self._logprobs
        state = self._logprobs.setdefault(chunk.index, CompletionLogprobs(self.ctx.strings))
        if self.ctx.echo_only:
            chunk = dataclasses.replace(chunk, text="", logprobs=[])
        if echo is not None and first:
            chunk = dataclasses.replace(chunk, text=echo.text + chunk.text)
        if self._skip(chunk):
            return None
        logprobs = None
        if self.ctx.logprobs:
            prompt = state.add_prompt(echo.token_ids, chunk.prompt_logprobs) if echo is not None and first else None
            logprobs = state.add(chunk.logprobs)
            if prompt is not None:
                logprobs = join_completion_logprobs(prompt, logprobs)
        choice = {"index": chunk.index, "text": chunk.text, "logprobs": logprobs,
                  "finish_reason": chunk.finish_reason}
        if chunk.finish_reason is not None:
            choice["stop_reason"] = _stop_reason(chunk)
        return self._envelope([choice])
