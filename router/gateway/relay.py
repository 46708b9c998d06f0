"""Relays one request's stream from the router core to the HTTP client.

The core's `RequestStream` (router/stream.py) is the one pump: the gateway reads it
directly. This module adds what only HTTP needs:
- `DisconnectWatcher`: while nothing is being sent (non-streaming requests, and streaming
  ones until the first chunk) it listens for the ASGI `http.disconnect` message and closes
  the stream, which aborts the request. Once a streaming response runs, Starlette's own
  disconnect listener cancels the SSE body, whose `finally` closes the stream.
- `sse_body`: the SSE events of a streamed response. Each chunk the core hands over (the
  tokens of one engine step) is written as its own event at once, never batched.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Union

from baton.router.gateway.errors import as_api_error
from baton.router.gateway.responses import ChatStream, CompletionStream
from baton.router.stream import StreamClosed
from baton.router.types import Chunk, ChunkStream
from baton.protos.errors import BatonError

log = logging.getLogger(__name__)


class DisconnectWatcher:
    """Closes a stream when the HTTP client goes away, until `stop()`."""

    def __init__(self, stream: ChunkStream, receive: Callable[[], Awaitable[dict]]) -> None:
        self.stream = stream
        self._task: Optional[asyncio.Task] = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Callable[[], Awaitable[dict]]) -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                break
        log.info("client disconnected; aborting request %s", self.stream.request_id)
        self.stream.close()

    def stop(self) -> None:
        """Stop listening (idempotent)."""
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()


def sse(obj: Any) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_body(stream: ChunkStream, first: Optional[Chunk],
                   formatter: Union[ChatStream, CompletionStream]) -> AsyncIterator[str]:
    """The SSE body of a streamed response, starting from an already received first chunk.

    Ends with the usage chunk (when asked for) and `[DONE]`; an error mid-stream is sent as
    one `data: {"error": ...}` event and the stream closes without `[DONE]`."""
    try:
        chunk = first
        while chunk is not None:
            obj = formatter.chunk(chunk)
            if obj is not None:
                yield sse(obj)
            chunk = await stream.next()
        usage = formatter.usage_chunk()
        if usage is not None:
            yield sse(usage)
        yield SSE_DONE
    except StreamClosed:
        return
    except Exception as e:
        error = as_api_error(e)
        if error.status >= 500 and not isinstance(e, BatonError):
            log.exception("streaming request %s failed", stream.request_id)
        yield sse(error.body())
    finally:
        stream.close()
