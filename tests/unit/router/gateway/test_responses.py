"""Response builders: shapes checked with the official openai client's pydantic types."""
from __future__ import annotations

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from baton.protos.baton.v1 import common_pb2
from baton.router.gateway.logprobs import MIN_LOGPROB, CompletionLogprobs, TokenStrings, chat_logprobs
from baton.router.gateway.responses import ChatStream, Collector, CompletionStream, ResponseContext
from baton.router.types import Chunk


@pytest.fixture(scope="module")
def strings(tokenizer) -> TokenStrings:
    return TokenStrings(tokenizer)


def lp(token_id: int, logprob: float, *alternatives: tuple[int, float]) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(token_id=token_id, logprob=logprob, top_logprobs=[
        common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in alternatives])


def script(tokenizer, texts: list[str], n: int = 1, logprobs: bool = False) -> list[Chunk]:
    """Chunks of n identical completions, one token each, interleaved; usage on the last."""
    ids = [tokenizer.encode(t)[0] for t in texts]
    chunks = []
    for pos, token in enumerate(ids):
        for index in range(n):
            last = pos == len(ids) - 1
            chunks.append(Chunk(
                index=index, token_ids=[token], text=texts[pos],
                logprobs=[lp(token, -0.5, (token, -0.5), (0, float("-inf")))] if logprobs else [],
                finish_reason="length" if last else None,
                usage=common_pb2.Usage(prompt_tokens=9, completion_tokens=len(ids), cached_tokens=4) if last else None))
    return chunks


def context(strings, **kw) -> ResponseContext:
    return ResponseContext(request_id="chatcmpl-1", model="smollm2", prompt_tokens=9, strings=strings, **kw)


def test_chat_completion_object(tokenizer, strings) -> None:
    collector = Collector(context(strings, n=2, logprobs=True))
    for chunk in script(tokenizer, ["Hello", " world"], n=2, logprobs=True):
        collector.add(chunk)
    obj = ChatCompletion.model_validate(collector.chat_completion())
    assert obj.object == "chat.completion" and obj.model == "smollm2" and len(obj.choices) == 2
    assert [c.index for c in obj.choices] == [0, 1]
    assert obj.choices[1].message.content == "Hello world" and obj.choices[1].message.role == "assistant"
    assert obj.choices[0].finish_reason == "length"
    content = obj.choices[0].logprobs.content
    assert [c.token for c in content] == ["Hello", " world"]
    assert content[1].bytes == list(b" world") and content[1].logprob == -0.5
    assert content[0].top_logprobs[1].logprob == MIN_LOGPROB  # -inf clamped: JSON stays valid
    assert obj.usage.prompt_tokens == 9 and obj.usage.completion_tokens == 4 and obj.usage.total_tokens == 13
    assert obj.usage.prompt_tokens_details.cached_tokens == 4


def test_text_completion_object(tokenizer, strings) -> None:
    collector = Collector(context(strings, logprobs=True))
    for chunk in script(tokenizer, ["Hello", " world"], logprobs=True):
        collector.add(chunk)
    raw = collector.text_completion()
    obj = Completion.model_validate(raw)
    assert obj.object == "text_completion" and obj.choices[0].text == "Hello world"
    logprobs = obj.choices[0].logprobs
    assert logprobs.tokens == ["Hello", " world"] and logprobs.token_logprobs == [-0.5, -0.5]
    assert logprobs.text_offset == [0, 5]
    assert logprobs.top_logprobs[0] == {"Hello": -0.5, "<|endoftext|>": MIN_LOGPROB}
    assert obj.usage.completion_tokens == 2 and raw["choices"][0]["stop_reason"] is None
    no_logprobs = Collector(context(strings))
    for chunk in script(tokenizer, ["Hi"]):
        no_logprobs.add(chunk)
    assert no_logprobs.text_completion()["choices"][0]["logprobs"] is None


def test_usage_falls_back_to_counted_tokens(strings) -> None:
    collector = Collector(context(strings))
    collector.add(Chunk(index=0, token_ids=[1, 2, 3], text="abc", finish_reason="stop", stop_reason="c"))
    obj = collector.chat_completion()
    assert obj["usage"]["completion_tokens"] == 3 and obj["usage"]["prompt_tokens"] == 9
    assert obj["choices"][0]["stop_reason"] == "c"


def test_chat_stream_chunks(tokenizer, strings) -> None:
    stream = ChatStream(context(strings, n=2, include_usage=True))
    objs = [stream.chunk(c) for c in script(tokenizer, ["Hello", " world"], n=2)]
    objs.append(stream.chunk(Chunk(index=0, token_ids=[5], text="")))  # nothing to say: skipped
    assert objs[-1] is None
    chunks = [ChatCompletionChunk.model_validate(o) for o in objs if o is not None]
    assert len(chunks) == 4 and all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks] == \
        [(0, "assistant"), (1, "assistant"), (0, None), (1, None)]
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices[0].index == 1) == "Hello world"
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, "length", "length"]
    final = ChatCompletionChunk.model_validate(stream.usage_chunk())
    assert final.choices == [] and final.usage.completion_tokens == 4 and final.usage.total_tokens == 13


def test_chat_stream_logprobs_and_no_usage(tokenizer, strings) -> None:
    stream = ChatStream(context(strings, logprobs=True))
    obj = stream.chunk(script(tokenizer, ["Hello"], logprobs=True)[0])
    assert "usage" not in obj and stream.usage_chunk() is None
    chunk = ChatCompletionChunk.model_validate(obj)
    assert chunk.choices[0].logprobs.content[0].token == "Hello"
    # a token without text still reports its logprob
    assert stream.chunk(Chunk(index=0, token_ids=[5], text="", logprobs=[lp(5, -1.0)])) is not None


def test_completion_stream_chunks(tokenizer, strings) -> None:
    stream = CompletionStream(context(strings, logprobs=True, include_usage=True))
    objs = [stream.chunk(c) for c in script(tokenizer, ["Hello", " world", "!"], logprobs=True)]
    for obj in objs:  # OpenAI sends finish_reason null mid-stream, which its type does not allow
        choice = obj["choices"][0]
        Completion.model_validate({**obj, "choices": [{**choice, "finish_reason": choice["finish_reason"] or "stop"}]})
        assert obj["object"] == "text_completion" and obj["usage"] is None
    assert [o["choices"][0]["text"] for o in objs] == ["Hello", " world", "!"]
    assert [o["choices"][0]["logprobs"]["text_offset"] for o in objs] == [[0], [5], [11]]
    assert objs[-1]["choices"][0]["finish_reason"] == "length"
    final = Completion.model_validate(stream.usage_chunk())
    assert final.choices == [] and final.usage.completion_tokens == 3


def test_token_strings_bytes(tokenizer, strings) -> None:
    text = "café 🚀"
    ids = tokenizer.encode(text)
    raw = b"".join(bytes(strings.bytes(t)) for t in ids)
    assert raw == text.encode("utf-8")  # exact even where a token holds part of a character
    partial = [t for t in ids if "\ufffd" in strings.text(t)]
    assert partial, "the rocket emoji spans several byte-level tokens"
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert strings.get(im_start) == ("<|im_start|>", b"<|im_start|>")


def test_logprob_helpers(strings) -> None:
    entries = [lp(19556, -0.1, (19556, -0.1), (905, -2.0))]
    assert chat_logprobs(entries, strings)["content"][0]["top_logprobs"][1]["logprob"] == -2.0
    state = CompletionLogprobs(strings)
    first, second = state.add(entries), state.add(entries)
    assert first["text_offset"] == [0] and second["text_offset"] == [len(strings.text(19556))]


def _echo_chunks(tokenizer, prompt_ids: list[int]) -> list[Chunk]:
    chunks = script(tokenizer, ["Hello", " world"], logprobs=True)
    chunks[0].prompt_logprobs = [lp(t, -1.0 - i, (t, -1.0 - i)) for i, t in enumerate(prompt_ids[1:])]
    return chunks


def test_echo_puts_the_prompt_and_its_logprobs_first(tokenizer, strings) -> None:
    from baton.router.gateway.convert import EchoPrompt
    prompt_ids = tokenizer.encode("Once upon a")
    echo = EchoPrompt(text="Once upon a", token_ids=prompt_ids)
    collector = Collector(context(strings, logprobs=True, echo=echo))
    for chunk in _echo_chunks(tokenizer, prompt_ids):
        collector.add(chunk)
    # (the openai client's types say float, but OpenAI's echo answers null for the first token, and
    # the client builds responses without validating them: e2e tests read these through it)
    whole = collector.text_completion()["choices"][0]
    assert whole["text"] == "Once upon a" + "Hello world"
    assert whole["logprobs"]["tokens"] == [strings.text(t) for t in prompt_ids] + ["Hello", " world"]
    assert whole["logprobs"]["token_logprobs"] == [None, -1.0, -2.0, -0.5, -0.5]
    assert whole["logprobs"]["top_logprobs"][0] is None and whole["logprobs"]["top_logprobs"][2] == {" a": -2.0}
    assert whole["logprobs"]["text_offset"] == [0, 4, 9, 11, 16]
    stream = CompletionStream(context(strings, logprobs=True, echo=echo))
    streamed = [stream.chunk(c) for c in _echo_chunks(tokenizer, prompt_ids)]
    assert "".join(s["choices"][0]["text"] for s in streamed) == whole["text"]
    for key in ("token_logprobs", "text_offset", "tokens"):
        assert sum((s["choices"][0]["logprobs"][key] for s in streamed), []) == whole["logprobs"][key]


def test_echo_only_drops_the_generated_token(tokenizer, strings) -> None:
    from baton.router.gateway.convert import EchoPrompt
    prompt_ids = tokenizer.encode("Once upon a")
    echo = EchoPrompt(text="Once upon a", token_ids=prompt_ids, only=True)
    chunk = _echo_chunks(tokenizer, prompt_ids)[0]
    chunk.finish_reason, chunk.usage = "length", common_pb2.Usage(prompt_tokens=3, completion_tokens=1)
    collector = Collector(context(strings, logprobs=True, echo=echo))
    collector.add(chunk)
    obj = collector.text_completion()
    assert obj["choices"][0]["text"] == "Once upon a"
    assert obj["choices"][0]["logprobs"]["token_logprobs"] == [None, -1.0, -2.0]
    assert obj["usage"]["completion_tokens"] == 0 and obj["usage"]["prompt_tokens"] == 3
    streamed = CompletionStream(context(strings, echo=echo)).chunk(chunk)
    assert streamed["choices"][0]["text"] == "Once upon a" and streamed["choices"][0]["finish_reason"] == "length"
