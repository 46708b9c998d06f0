"""Relays one request's stream from the router core to the HTTP client.

The core's `RequestStream` (router/stream.py) is the one pump: the gateway reads it
directly. This module adds what only HTTP needs:
- `DisconnectWatcher`: while nothing is being sent (non-streaming requests, and streaming
  ones until the first chunk) it listens for the ASGI `http.disconnect` message and closes
  the stream, which aborts the request. Once a streaming response runs, Starlette's own
  disconnect listener cancels the SSE body, whose `finally` closes the stream.
- `first_chunk`: a streamed response's first chunk, read before the 200 header is sent, so an
  error before it keeps its HTTP status; None when the client went away first.
- `sse_body`: the SSE events of a streamed response. Each chunk the core hands over (the
  tokens of one engine step) is written as its own event at once, never batched.
- `StreamOutcome`: what a response really ended as, for the request counter. A stream that
  fails after its 200 header (an error event) counts with the status its error would have had
  before the header (503 for no_worker, ...), the same labels the gRPC API uses, and as a
  stream failure by reason; one whose client went away mid-way counts as 499, client_closed.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Awaitable, Callable, Optional, Union

from baton.protos.errors import ErrorCode
from baton.router.gateway.errors import CLIENT_CLOSED_STATUS, as_api_error, status_for_code
from baton.router.gateway.responses import ChatStream, CompletionStream
from baton.router.gateway.sse import SSE_DONE, sse
from baton.router.stream import StreamClosed
from baton.router.types import Chunk, ChunkStream
from baton.protos.errors import BatonError

log = logging.getLogger(__name__)


async def first_chunk(stream: ChunkStream, watcher: "DisconnectWatcher") -> Optional[Chunk]:
    """The stream's first chunk (errors before it propagate, the stream closed); None, the stream
    closed, when the client went away first. Stops the watcher: from here Starlette watches the
    connection."""
    try:
        return await stream.next()
    except StreamClosed:
        stream.close()
        return None
    except BaseException:
        stream.close()
        raise
    finally:
        watcher.stop()


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


async def sse_body(stream: ChunkStream, first: Optional[Chunk],
                   formatter: Union[ChatStream, CompletionStream]) -> AsyncIterator[bytes]:
    """The SSE body of a streamed response, starting from an already received first chunk.

    Ends with the usage chunk (when asked for) and `[DONE]`; an error mid-stream is sent as
    one `data: {"error": ...}` event and the stream closes without `[DONE]`."""
    try:
        chunk = first
        event = formatter.event
        while chunk is not None:
            data = event(chunk)
            if data is not None:
                yield data
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


_ERROR_EVENT = b'data: {"error"'


class StreamOutcome:
    """Follows the ASGI messages of one response (`see`) and says how it really ended (`result`)."""

    def __init__(self) -> None:
        self.status = 0
        self._sse = False
        self._ended = False
        self.reason = ""
        """Why a started stream failed ("" when it did not): the error code, or client_closed."""
        self._failed_status = 0

    def see(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = dict(message.get("headers") or ())
            self._sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if self._sse and body.startswith(_ERROR_EVENT) and not self.reason:
                self.reason, self._failed_status = _error_event(body)
            if not message.get("more_body", False):
                self._ended = True

    def result(self) -> tuple[int, str]:
        """(status label, stream failure reason or "")."""
        if self._sse and self.status == 200:
            if self.reason:
                return self._failed_status, self.reason
            if not self._ended:
                return CLIENT_CLOSED_STATUS, "client_closed"
        return self.status, ""


def _error_event(body: bytes) -> tuple[str, int]:
    """(reason, status) of an SSE error event: the error code and the HTTP status it maps to."""
    try:
        code = str(json.loads(body[len(b"data: "):].split(b"\n\n", 1)[0])["error"].get("code") or "internal")
    except (ValueError, KeyError, AttributeError):
        return "internal", 500
    number = ErrorCode.Value(code.upper()) if code.upper() in ErrorCode.keys() else None
    return code, status_for_code(number) if number is not None else 500
