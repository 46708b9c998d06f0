"""The one pump between the router core and a client: `RequestStream`.

`RouterCore.open_stream(request)` starts the request's pipeline in a task of its own and
returns its `RequestStream`. The task puts each chunk on the stream's queue as soon as the
decode worker sends it; the consumer (the HTTP gateway's response, or the gRPC `Generate`
handler) reads them with `await stream.next()` or `async for`. The pipeline always runs in
that one task, whatever task the consumer reads from (Starlette reads an SSE body in another
task than the route handler that got the first chunk).

Ends: `next()` returns None after the last chunk, raises the `BatonError` that ended the
request, or raises `StreamClosed` once `close()` was called. `close()` is synchronous and
idempotent (safe in a `finally` under cancellation); a request still running is cancelled,
which cancels its gRPC call to the decode worker, which aborts it there.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable, Optional

from baton.protos.errors import BatonError, ErrorCode
from baton.router.types import Chunk

log = logging.getLogger(__name__)

Emit = Callable[[Chunk], None]
"""How the pipeline hands one chunk to the stream."""

_END = object()
_CLOSED = object()


class StreamClosed(Exception):
    """The stream was closed by its consumer (the client went away)."""


class RequestStream:
    """One request's chunks, from its pipeline task to one consumer."""

    def __init__(self, request_id: str, pipeline: Callable[[Emit], Awaitable[None]],
                 on_end: Callable[["RequestStream"], None] = lambda _: None) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue = asyncio.Queue()
        self._on_end = on_end
        self.ended = False
        """True once the pipeline finished (successfully or not)."""
        self._closed = False
        self._task = asyncio.create_task(self._pump(pipeline), name=f"request-{request_id}")

    async def _pump(self, pipeline: Callable[[Emit], Awaitable[None]]) -> None:
        item: object = _END
        try:
            await pipeline(self._queue.put_nowait)
        except BatonError as error:
            item = error
        except asyncio.CancelledError:
            item = BatonError(ErrorCode.ABORTED, "the request was aborted")
        except Exception as error:  # a bug in the pipeline: the client still gets an error, not a hang
            log.exception("router pipeline failed on request %s", self.request_id)
            item = BatonError(ErrorCode.INTERNAL, f"internal error: {type(error).__name__}")
        finally:
            self.ended = True
            self._queue.put_nowait(item)
            self._on_end(self)

    async def next(self) -> Optional[Chunk]:
        """The next chunk; None at the end. Raises the request's BatonError, or StreamClosed."""
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # a later next() sees the end again
            return None
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)
            raise StreamClosed()
        if isinstance(item, BaseException):
            raise item
        return item

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while (chunk := await self.next()) is not None:
            yield chunk

    def cancel(self) -> bool:
        """Abort the request if it is still running; True when it was."""
        if self._task.done():
            return False
        self._task.cancel()
        return True

    def close(self) -> None:
        """Stop reading: abort the request unless it ended; `next()` raises StreamClosed."""
        if self._closed:
            return
        self._closed = True
        self.cancel()
        self._queue.put_nowait(_CLOSED)
