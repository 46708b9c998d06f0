"""serve_gateway: a real uvicorn server on a free port; client disconnects abort requests."""
from __future__ import annotations

import asyncio

import httpx
import openai

from baton.router.gateway.server import http_protocol, serve_gateway


async def _until(predicate, timeout_s: float = 3.0) -> bool:
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def test_serve_and_abort_on_disconnect(fake_core) -> None:
    async def scenario() -> None:
        server, port = await serve_gateway(fake_core, "127.0.0.1", 0)
        assert port == server.port and port > 0
        assert http_protocol() == "httptools"  # a dependency: the C parser, not the pure-Python h11
        assert server.config.http_protocol_class.__name__ == "HttpToolsProtocol"
        base = f"http://127.0.0.1:{port}"
        try:
            client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            reply = await client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}])
            assert reply.choices[0].message.content == "Hello there, friend!"

            fake_core.hang_after = 1
            async with httpx.AsyncClient(base_url=base) as http:
                try:  # non-streaming: the client gives up while the core is busy
                    await http.post("/v1/completions", json={"prompt": "x"}, timeout=0.3)
                except httpx.TimeoutException:
                    pass
                assert await _until(lambda: len(fake_core.aborted) == 1)
                async with http.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as stream:
                    async for line in stream.aiter_lines():
                        assert line.startswith("data: {")
                        break  # streaming: leave after the first event
                assert await _until(lambda: len(fake_core.aborted) == 2)
            assert fake_core.aborted == [r.request_id for r in fake_core.requests[1:]]
        finally:
            await server.stop()
        assert server.task.done()

    asyncio.run(scenario())
