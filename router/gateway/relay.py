"""Relays one request's chunks from the router core to the HTTP client.

A `Relay` consumes `core.generate(request)` in a task of its own (so the core's generator
always runs in one task, whatever deadlines or scopes it holds) and queues what comes out:
chunks, then the end or the `RouterError` that ended it. The HTTP side reads with `next()`.

Cancellation: `close()` is idempotent and synchronous (safe in a `finally` under anyio
cancellation); when the core's stream has not ended yet it cancels the pump task and calls
`core.abort(request_id)` in a background task. `watch_disconnect(receive)` closes the relay
as soon as the client goes away (the ASGI `http.disconnect` message), used while nothing is
being sent (non-streaming requests, and streaming ones until the first chunk); once a
streaming response is running, Starlette's own disconnect listener cancels the SSE body,
whose `finally` closes the relay.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Union

from baton.protos.baton.v1 import common_pb2
from baton.router.gateway.errors import as_api_error
from baton.router.gateway.responses import ChatStream, CompletionStream
from baton.router.types import Chunk, RouterError, RouterRequest

log = logging.getLogger(__name__)

_END = object()
_GONE = object()
_background: set[asyncio.Task] = set()


def spawn(coro: Awaitable[Any]) -> asyncio.Task:
    """Run a coroutine in the background, holding a reference until it finishes."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was complete."""


class Relay:
    """One request in flight between the core and the client."""

    def __init__(self, core, request: RouterRequest) -> None:
        self.core = core
        self.request = request
        self._queue: asyncio.Queue = asyncio.Queue()
        self._ended = False
        self._closed = False
        self._watcher: Optional[asyncio.Task] = None
        self._task = asyncio.create_task(self._pump(), name=f"relay-{request.request_id}")

    async def _pump(self) -> None:
        item: Any = _END
        try:
            async for chunk in self.core.generate(self.request):
                self._queue.put_nowait(chunk)
        except RouterError as e:
            item = e
        except Exception as e:  # a bug in the core: the client still gets an error, not a hang
            log.exception("router core failed on request %s", self.request.request_id)
            item = RouterError(common_pb2.ErrorCode.INTERNAL, f"internal error: {type(e).__name__}")
        self._ended = True
        self._queue.put_nowait(item)

    async def next(self) -> Optional[Chunk]:
        """The next chunk; None at the end. Raises the core's RouterError, or
        ClientDisconnected once the relay was closed."""
        item = await self._queue.get()
        if item is _END:
            return None
        if item is _GONE:
            raise ClientDisconnected()
        if isinstance(item, RouterError):
            raise item
        return item

    def watch_disconnect(self, receive: Callable[[], Awaitable[dict]]) -> None:
        """Close the relay when `receive` reports `http.disconnect`."""
        self._watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Callable[[], Awaitable[dict]]) -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                break
        if not self._ended:
            log.info("client disconnected; aborting request %s", self.request.request_id)
        self.close()

    def stop_watching(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()

    def close(self) -> None:
        """Stop relaying; abort the request in the core unless its stream already ended."""
        self.stop_watching()
        if self._closed:
            return
        self._closed = True
        if not self._ended:
            self._task.cancel()
            spawn(self._abort())
        self._queue.put_nowait(_GONE)

    async def _abort(self) -> None:
        try:
            await self.core.abort(self.request.request_id)
        except Exception:
            log.exception("aborting request %s failed", self.request.request_id)


def sse(obj: Any) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_body(relay: Relay, first: Optional[Chunk],
                   stream: Union[ChatStream, CompletionStream]) -> AsyncIterator[str]:
    """The SSE body of a streamed response, starting from an already received first chunk.

    Ends with the usage chunk (when asked for) and `[DONE]`; an error mid-stream is sent as
    one `data: {"error": ...}` event and the stream closes without `[DONE]`."""
    try:
        chunk = first
        while chunk is not None:
            obj = stream.chunk(chunk)
            if obj is not None:
                yield sse(obj)
            chunk = await relay.next()
        usage = stream.usage_chunk()
        if usage is not None:
            yield sse(usage)
        yield SSE_DONE
    except ClientDisconnected:
        return
    except Exception as e:
        error = as_api_error(e)
        if error.status >= 500 and not isinstance(e, RouterError):
            log.exception("streaming request %s failed", relay.request.request_id)
        yield sse(error.body())
    finally:
        relay.close()
