"""The worker side of `Decode.GenerateStream`: many `Generate` calls on one gRPC stream.

The router keeps one long-lived stream per decode worker and sends each request on it as a
frame (`DecodeStreamFrame.start`); this module runs every such call through the worker's own
`Generate(request, context)` handler, unchanged, and sends its responses back as events
tagged with the call's id. A per-request gRPC call costs a Python `grpc.aio` server a few
hundred microseconds of CPU on top of its messages; a frame on an open stream costs a small
fraction of that, and frames and events are batched (each message carries whatever was ready
when the writer last woke), so under load one message serves many requests.

Semantics are those of separate `Generate` calls:
- each call runs in a task of its own; the handler's `context.abort(code, details,
  trailing_metadata)` ends that call alone, with the same status and typed trailers a
  separate call would carry (`DecodeStreamEvent.end`); an exception the handler does not
  handle ends it with UNKNOWN, as grpc.aio does;
- a `cancel` frame cancels the call's task, as a client cancelling its call would (the
  handler's `finally` aborts the request in the engine); no end event follows;
- the stream ending (the router went away, or cancelled it) cancels every call on it.

- the server stopping (`DecodeStreamServer.close`, a stop hook) makes each stream take no new
  call (UNAVAILABLE: the router retries elsewhere) and end once its calls are done.

Both the real decode servicer and the simulated one serve their `GenerateStream` through a
`DecodeStreamServer`.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable, Optional

import grpc

from baton.protos.baton.v1 import worker_pb2

log = logging.getLogger(__name__)

GenerateHandler = Callable[[worker_pb2.DecodeRequest, object], AsyncIterator[worker_pb2.DecodeResponse]]
"""A servicer's `Generate(request, context)`: an async generator of responses."""

_DONE = object()
MAX_BATCH_BYTES = 1 << 20
"""A batch of events stops growing past this size (the router's channel takes 4 MiB messages)."""


class CallAborted(Exception):
    """Raised by `CallContext.abort`: the handler ended its call with a status."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing_metadata = code, details, tuple(trailing_metadata or ())


class CallContext:
    """What a `Generate` handler sees as its `grpc.aio.ServicerContext` for one call on the
    stream: `abort` ends this call only; peer and metadata are the stream's."""

    def __init__(self, stream_context: grpc.aio.ServicerContext, deadline: Optional[float]) -> None:
        self._stream, self._deadline = stream_context, deadline
        self.code: Optional[grpc.StatusCode] = None
        self.details = ""
        self.trailing_metadata: tuple = ()

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        raise CallAborted(code, details, trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailing_metadata) -> None:
        self.trailing_metadata = tuple(trailing_metadata)

    def time_remaining(self) -> Optional[float]:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def peer(self) -> str:
        return self._stream.peer()

    def invocation_metadata(self):
        return self._stream.invocation_metadata()


def _end(call_id: int, code: grpc.StatusCode, details: str = "", trailing=()) -> worker_pb2.DecodeStreamEvent:
    event = worker_pb2.DecodeStreamEvent(call_id=call_id, end=True, status_code=code.value[0], details=details)
    for key, value in trailing:
        event.trailing_metadata[key] = value.decode() if isinstance(value, bytes) else str(value)
    return event


class _Stream:
    """The calls of one `GenerateStream` RPC and the queue of events to send back."""

    def __init__(self, generate: GenerateHandler, context: grpc.aio.ServicerContext) -> None:
        self.generate, self.context = generate, context
        self.calls: dict[int, asyncio.Task] = {}
        self.out: asyncio.Queue = asyncio.Queue()
        self.accepting = True
        """False once the caller closed its side or the server is stopping: no new call; the
        stream ends once the calls in flight are done."""

    def stop_accepting(self) -> None:
        self.accepting = False
        if not self.calls:
            self.out.put_nowait(_DONE)

    async def run_call(self, call_id: int, request: worker_pb2.DecodeRequest) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.timeout_ms / 1000 if request.timeout_ms else None
        context = CallContext(self.context, deadline)
        put = self.out.put_nowait
        try:
            async for response in self.generate(request, context):
                put(worker_pb2.DecodeStreamEvent(call_id=call_id, response=response))
            code = context.code or grpc.StatusCode.OK
            put(_end(call_id, code, context.details, context.trailing_metadata))
        except CallAborted as aborted:
            put(_end(call_id, aborted.code, aborted.details, aborted.trailing_metadata))
        except asyncio.CancelledError:
            pass  # cancelled by the caller (a cancel frame) or with the stream: nobody waits for an end
        except Exception as error:  # what grpc.aio answers for a handler's unhandled exception
            log.exception("decode stream call %d (%s) failed", call_id, request.request_id)
            put(_end(call_id, grpc.StatusCode.UNKNOWN, f"Unexpected {type(error).__name__}: {error}"))
        finally:
            if self.calls.get(call_id) is asyncio.current_task():
                del self.calls[call_id]
            if not self.accepting and not self.calls:
                put(_DONE)

    async def read_frames(self, frames: AsyncIterator[worker_pb2.DecodeStreamFrames]) -> None:
        try:
            async for message in frames:
                for frame in message.frames:
                    if frame.cancel:
                        task = self.calls.pop(frame.call_id, None)
                        if task is not None:
                            task.cancel()
                    elif not self.accepting:  # the server is stopping: the caller retries elsewhere
                        self.out.put_nowait(_end(frame.call_id, grpc.StatusCode.UNAVAILABLE,
                                                 "the decode worker is stopping"))
                    elif frame.call_id in self.calls:
                        self.out.put_nowait(_end(frame.call_id, grpc.StatusCode.INVALID_ARGUMENT,
                                                 f"call id {frame.call_id} is already running on this stream"))
                    else:
                        self.calls[frame.call_id] = asyncio.create_task(
                            self.run_call(frame.call_id, frame.start), name=f"decode-call-{frame.start.request_id}")
        finally:
            self.stop_accepting()  # the caller closed its side

    def cancel_all(self) -> None:
        for task in list(self.calls.values()):
            task.cancel()
        self.calls.clear()


class DecodeStreamServer:
    """The `GenerateStream` RPCs of one servicer: `serve` runs one through `generate`;
    `close` (a `ServiceServer` stop hook) makes each take no new call and end once its calls
    are done, so a stopping server does not wait out its grace period for idle streams."""

    def __init__(self, generate: GenerateHandler) -> None:
        self.generate = generate
        self._streams: set[_Stream] = set()
        self._closed = False

    def close(self) -> None:
        self._closed = True
        for stream in list(self._streams):
            stream.stop_accepting()

    async def serve(self, frames: AsyncIterator[worker_pb2.DecodeStreamFrames],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.DecodeStreamEvents]:
        """Serve one `GenerateStream` RPC: run each started call and stream the events back in
        batches, until the caller closes its side (or the server stops) and the calls are done."""
        stream = _Stream(self.generate, context)
        if self._closed:
            stream.stop_accepting()
        self._streams.add(stream)
        reader = asyncio.create_task(stream.read_frames(frames), name="decode-stream-reader")
        out = stream.out
        item = None
        try:
            while True:
                if item is None:
                    item = await out.get()
                batch, size = [], 0
                while item is not _DONE:
                    batch.append(item)
                    size += item.ByteSize()
                    item = None
                    if out.empty() or size >= MAX_BATCH_BYTES:
                        break
                    item = out.get_nowait()
                if batch:
                    yield worker_pb2.DecodeStreamEvents(events=batch)
                if item is _DONE:
                    return
        finally:
            self._streams.discard(stream)
            reader.cancel()
            stream.cancel_all()
