"""bench.serving.client against a raw asyncio HTTP server that writes a scripted SSE stream: what
the server sends together (one write) arrives in one network read, writes 60 ms apart in
separate reads; per-chunk usage (continuous_usage_stats) gives each chunk's tokens; without
it the runner counts them with a tokenizer, else 1 per chunk."""
from __future__ import annotations

import asyncio
import json

import pytest

from baton.bench.serving.client import BenchClient
from baton.bench.serving.metrics import summarize
from baton.bench.serving.runner import count_chunk_tokens
from tests.helpers.tiny_models import word_tokenizer

GAP_S = 0.06


def event(text: str, total=None, endpoint="chat") -> bytes:
    choice = ({"index": 0, "delta": {"content": text}, "finish_reason": None} if endpoint == "chat"
              else {"index": 0, "text": text, "finish_reason": None})
    body = {"id": "x", "object": "chat.completion.chunk" if endpoint == "chat" else "text_completion",
            "created": 0, "model": "m", "choices": [choice]}
    if total is not None:
        body["usage"] = {"prompt_tokens": 5, "completion_tokens": total, "total_tokens": 5 + total}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def final_usage(total: int) -> bytes:
    body = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": total, "total_tokens": 5 + total}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def serve_script(script, bodies):
    """A server answering every POST with `script`: a list of writes, each a list of SSE events."""
    async def handle(reader, writer):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = next(int(line.split(":")[1]) for line in head.split("\r\n")
                      if line.lower().startswith("content-length"))
        bodies.append(json.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        for events in [*script, [b"data: [DONE]\n\n"]]:
            await asyncio.sleep(GAP_S)
            writer.write(b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()
    return await asyncio.start_server(handle, "127.0.0.1", 0)


def stream(script, endpoint="chat", **client_kw):
    bodies: list = []

    async def go():
        server = await serve_script(script, bodies)
        port = server.sockets[0].getsockname()[1]
        try:
            async with BenchClient(f"http://127.0.0.1:{port}", "k", timeout_s=10, endpoint=endpoint,
                                   **client_kw) as client:
                assert client.reads_observed
                return await client.send("m", [{"role": "user", "content": "hi"}], 8, 3)
        finally:
            server.close()
    return asyncio.run(go()), bodies


def test_per_chunk_usage_and_reads_give_per_token_itls():
    rec, bodies = stream([[event("a", 1)], [event(" b c", 3)], [event(" d", 4), event(" e", 5)], [final_usage(5)]])
    assert bodies[0]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert rec.success and rec.text == "a b c d e" and rec.output_tokens == 5 and rec.output_tokens_from_usage
    assert rec.chunk_tokens == [1, 2, 1, 1] and rec.tokens_counted_by == "usage"
    first = rec.chunk_reads[0]
    assert rec.chunk_reads == [first, first + 1, first + 2, first + 2]  # the last two came in one read
    assert rec.chunk_times[2] == rec.chunk_times[3]  # stamped with their read's time
    t = rec.chunk_times
    assert rec.itls == pytest.approx([(t[1] - t[0]) / 2] * 2 + [(t[2] - t[1]) / 2] * 2)
    assert all(gap > GAP_S / 2 * 0.5 for gap in rec.itls)  # no near-zero gaps
    c = summarize([rec])["coalescing"]
    assert c["multi_token_chunk_fraction"] == pytest.approx(1 / 4)
    assert c["multi_chunk_read_fraction"] == pytest.approx(1 / 3)


def test_without_per_chunk_usage_tokens_come_from_the_tokenizer_or_count_one_per_chunk():
    script = [[event("w5", endpoint="completions")], [event(" w6 w7 w8", endpoint="completions")],
              [event(" w9", endpoint="completions")]]
    rec, bodies = stream(script, endpoint="completions", continuous_usage=False)
    assert bodies[0]["stream_options"] == {"include_usage": True} and bodies[0]["prompt"] == "hi"
    assert rec.tokens_counted_by == "events" and rec.token_counts == [1, 1, 1] and rec.output_tokens == 3
    assert len(rec.itls) == 2
    count_chunk_tokens([rec], word_tokenizer())
    assert rec.chunk_tokens == [1, 3, 1] and rec.tokens_counted_by == "tokenizer" and rec.output_tokens == 5
    assert len(rec.itls) == 4 and summarize([rec])["coalescing"]["multi_token_chunks"] == 1


def test_usage_counts_are_kept_over_the_tokenizer():
    rec, _ = stream([[event("w5", 1)], [event(" w6 w7", 2)], [final_usage(2)]])
    count_chunk_tokens([rec], word_tokenizer())
    assert rec.tokens_counted_by == "usage" and rec.chunk_tokens == [1, 1] and rec.output_tokens == 2
