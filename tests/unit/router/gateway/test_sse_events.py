"""Streamed events: the templated common chunk (responses.py `event`) writes exactly the bytes
of the dict path (`sse(chunk(...))`, json.dumps compact with non-ASCII kept), for chat and
completions, every option that touches a chunk's shape, and texts JSON must escape."""
from __future__ import annotations

import json

import pytest
from openai.types.chat import ChatCompletionChunk

from baton.protos.baton.v1 import common_pb2
from baton.router.gateway.convert import EchoPrompt
from baton.router.gateway.logprobs import TokenStrings
from baton.router.gateway.responses import ChatStream, CompletionStream, ResponseContext
from baton.router.gateway.sse import SSE_DONE, compact_json, sse
from baton.router.gateway.tools import ToolChatStream, ToolPlan
from baton.router.types import Chunk

TEXTS = ["Hello", "", ' "quoted"', " back\\slash", "\n\t\x01\x1f", " héllo ✓ 日本", "</script>", " \u2028", " last"]


@pytest.fixture(scope="module")
def strings(tokenizer) -> TokenStrings:
    return TokenStrings(tokenizer)


def _chunks(n: int) -> list[Chunk]:
    chunks = []
    for pos, text in enumerate(TEXTS):
        for index in range(n):
            last = pos == len(TEXTS) - 1
            chunks.append(Chunk(
                index=index, token_ids=[pos + 1] if text else [], text=text,
                logprobs=[common_pb2.TokenLogprob(token_id=pos + 1, logprob=-0.25)] if text else [],
                finish_reason="stop" if last else None, stop_reason="</s>" if last else "",
                usage=common_pb2.Usage(prompt_tokens=9, completion_tokens=8, cached_tokens=3) if last else None))
    return chunks


OPTIONS = [dict(), dict(n=2), dict(include_usage=True), dict(include_usage=True, continuous_usage=True),
           dict(n=2, include_usage=True, continuous_usage=True), dict(continuous_usage=True),
           dict(logprobs=True), dict(n=2, include_usage=True)]


def _context(strings, **kw) -> ResponseContext:
    return ResponseContext(request_id="chatcmpl-\"x\"", model="smöl/lm2", prompt_tokens=9, strings=strings,
                           created=1764600000, **kw)


@pytest.mark.parametrize("options", OPTIONS + [dict(echo=EchoPrompt(text="Say:", token_ids=[1, 2], only=False)),
                                               dict(echo=EchoPrompt(text="Say:", token_ids=[1, 2], only=True))])
def test_completion_events_equal_the_dict_path(strings, options) -> None:
    templated, reference = CompletionStream(_context(strings, **options)), CompletionStream(_context(strings, **options))
    events = []
    for chunk in _chunks(options.get("n", 1)):
        event, obj = templated.event(chunk), reference.chunk(chunk)
        assert event == (None if obj is None else sse(obj))
        if event is not None:
            events.append(event)
            assert json.loads(event[len(b"data: "):])["choices"][0]["index"] == chunk.index
    assert templated.usage_chunk() == reference.usage_chunk()
    assert len(events) >= 2


@pytest.mark.parametrize("options", OPTIONS)
def test_chat_events_equal_the_dict_path(strings, options) -> None:
    templated, reference = ChatStream(_context(strings, **options)), ChatStream(_context(strings, **options))
    sent = 0
    for chunk in _chunks(options.get("n", 1)):
        event, obj = templated.event(chunk), reference.chunk(chunk)
        assert event == (None if obj is None else sse(obj))
        if event is not None:
            sent += 1
            parsed = ChatCompletionChunk.model_validate(json.loads(event[len(b"data: "):]))
            assert parsed.choices[0].delta.content == chunk.text
    assert sent == (len(TEXTS) - (0 if options.get("continuous_usage") else 1)) * options.get("n", 1)
    assert templated.usage_chunk() == reference.usage_chunk()


def test_tool_stream_keeps_its_own_chunks(strings) -> None:
    """A subclass that rewrites chunks (a named tool call's arguments) never takes the template."""
    stream = ToolChatStream(_context(strings), ToolPlan(mode="named", named="get_weather"))
    events = [stream.event(Chunk(index=0, token_ids=[1], text=t)) for t in ['{"city"', ': "Paris"}']]
    assert all(b'"tool_calls"' in e and b'"content"' not in e for e in events)
    assert json.loads(events[1][len(b"data: "):])["choices"][0]["delta"]["tool_calls"][0]["function"] == \
        {"arguments": ': "Paris"}'}


def test_sse_framing() -> None:
    obj = {"a": "é\"", "b": [1, None, 2.5]}
    assert sse(obj) == f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()
    assert compact_json(obj) == '{"a":"é\\"","b":[1,null,2.5]}' and SSE_DONE == b"data: [DONE]\n\n"
