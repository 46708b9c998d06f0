"""Failure injection for the FastAPI app: a scripted core fails before and during a stream
(errors that are hard to trigger on real workers). Normal traffic is tested end to end."""
from __future__ import annotations

import asyncio
import json

import httpx

from baton.protos.baton.v1 import common_pb2
from baton.router.gateway.app import create_app

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}


def call(core, method: str, path: str, **kw) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(core))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.request(method, path, **kw)
    return asyncio.run(go())


def events(response: httpx.Response) -> list[str]:
    assert response.headers["content-type"].startswith("text/event-stream")
    return [line[len("data: "):] for line in response.text.split("\n\n") if line]


def test_errors_before_and_during_the_stream(fake_core) -> None:
    fake_core.fail_before = common_pb2.ErrorCode.OVERLOADED
    response = call(fake_core, "POST", "/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 429 and response.json()["error"]["code"] == "overloaded"
    assert int(response.headers["retry-after"]) >= 1
    fake_core.fail_before, fake_core.fail_after = None, 2
    data = events(call(fake_core, "POST", "/v1/completions", json={"prompt": "x", "stream": True}))
    assert len(data) == 3 and json.loads(data[-1])["error"]["type"] == "service_unavailable_error"
    response = call(fake_core, "POST", "/v1/completions", json={"prompt": "x"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_worker"
    response = call(fake_core, "POST", "/v1/chat/completions", json={**CHAT, "model": "gpt-4"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = call(fake_core, "POST", "/v1/chat/completions", content=b'{"messages": [}')
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    metrics = call(fake_core, "GET", "/metrics").text
    assert 'baton_router_requests_total{api="chat",status="429"} 1.0' in metrics
    # the stream that failed after its 200 header counts as the 503 its error is (issue 18)
    assert 'baton_router_requests_total{api="completions",status="503"} 2.0' in metrics
    assert 'api="completions",status="200"' not in metrics
    assert 'baton_router_stream_failures_total{api="completions",reason="no_worker"} 1.0' in metrics


def test_continuous_usage_counts_every_chunk(fake_core) -> None:
    body = {"prompt": "x", "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    data = [json.loads(e) for e in events(call(fake_core, "POST", "/v1/completions", json=body))[:-1]]
    counts = [d["usage"]["completion_tokens"] for d in data if d["choices"]]
    expected = len(fake_core.tokenizer.encode(fake_core.reply))
    assert counts == list(range(1, expected + 1))  # the scripted core sends one token per chunk
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] == expected
    plain = [json.loads(e) for e in events(call(fake_core, "POST", "/v1/completions",
                                                json={**body, "stream_options": {"include_usage": True}}))[:-1]]
    assert all(d["usage"] is None for d in plain if d["choices"])


def test_bodies_over_the_limit_get_413_before_parsing(fake_core) -> None:
    big = {"prompt": "x" * (70 << 10), "max_tokens": 1}
    response = call(fake_core, "POST", "/v1/completions", json=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    async def chunked():  # no Content-Length: the streamed body is counted
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}'
    response = call(fake_core, "POST", "/v1/completions", content=chunked())
    assert response.status_code == 413 and not fake_core.requests
    assert call(fake_core, "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
