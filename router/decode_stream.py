"""The router side of `Decode.GenerateStream`: one multiplexed stream per decode worker.

`DecodeStreamClient.generate(request, timeout)` starts a `Generate` call on the worker's
shared stream and returns a `StreamedCall`, which reads and cancels like the `grpc.aio`
call `DecodeStub.Generate` returns: `read()` gives each `DecodeResponse` in order, then
`grpc.aio.EOF`; a failed call raises `grpc.aio.AioRpcError` with the status and typed
trailers the worker sent (so `error_from_rpc` reads it as it reads a separate call); after
`cancel()` a read raises `asyncio.CancelledError`, as grpc.aio does. The call's timeout is
kept here (DEADLINE_EXCEEDED, and a cancel frame tells the worker).

The stream opens on the first call and is shared by every call until it breaks. When it
breaks (the worker died or restarted, the channel closed), every call on it fails with the
stream's status (UNAVAILABLE for a dead worker: the pipeline retries or migrates exactly as
for a separate call) and the next call opens a new stream. A worker that does not
implement `GenerateStream` (UNIMPLEMENTED: an older build) gets separate `Generate` calls
from then on, and the calls that were waiting on the stream are re-sent that way.

Why (bench/RESULTS.md, "One stream per worker"): a `grpc.aio` call costs each side a few
hundred microseconds of Python CPU; a frame on an open stream a fraction of that, and the
writer batches whatever frames are ready into one message.
"""
from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Optional

import grpc

from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc

_CANCELLED = object()
MAX_FRAMES_BYTES = 4 << 20
"""A message of frames stops growing past this size (a worker takes 64 MiB messages by default)."""


def _rpc_error(code: grpc.StatusCode, details: str, trailing=()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


class StreamedCall:
    """One `Generate` call on a worker's shared stream (see the module doc)."""

    __slots__ = ("call_id", "request", "_stream", "_items", "_waiter", "_timer", "_ended", "_inner", "_expires")

    def __init__(self, stream: "_Stream", call_id: int, request: worker_pb2.DecodeRequest, timeout: float) -> None:
        self.call_id, self.request, self._stream = call_id, request, stream
        self._items: deque = deque()
        self._waiter: Optional[asyncio.Future] = None
        self._ended = False
        self._inner = None  # the separate grpc.aio call, once fallen back to one
        loop = asyncio.get_running_loop()
        self._expires = loop.time() + timeout
        self._timer = loop.call_later(timeout, self._expire)

    async def read(self):
        """The next response, `grpc.aio.EOF` after the last; raises as the call failed."""
        while not self._items:
            if self._inner is not None:
                return await self._inner.read()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items[0]
        if item is _CANCELLED:
            raise asyncio.CancelledError()
        if isinstance(item, grpc.aio.AioRpcError):
            raise item
        if item is not grpc.aio.EOF:  # the end stays: every later read sees it again
            self._items.popleft()
        return item

    def cancel(self) -> bool:
        """Abort the call (a cancel frame to the worker); False when it had already ended."""
        if self._inner is not None:
            return self._inner.cancel()
        if self._ended:
            return False
        self._finish(_CANCELLED)
        self._stream.send_cancel(self.call_id)
        return True

    # --- fed by the stream ------------------------------------------------------------
    def _push(self, item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _deliver(self, response: worker_pb2.DecodeResponse) -> None:
        if not self._ended:
            self._push(response)

    def _finish(self, item) -> None:
        """The call's last item: EOF, an AioRpcError or the cancel marker."""
        if self._ended:
            return
        self._ended = True
        self._timer.cancel()
        stream = self._stream
        stream.calls.pop(self.call_id, None)
        if stream.retired and not stream.calls:
            stream.half_close()
        self._push(item)

    def _end(self, event: worker_pb2.DecodeStreamEvent) -> None:
        status = _STATUS_BY_VALUE.get(event.status_code, grpc.StatusCode.UNKNOWN)
        if status is grpc.StatusCode.OK:
            self._finish(grpc.aio.EOF)
        else:
            self._finish(_rpc_error(status, event.details, tuple(event.trailing_metadata.items())))

    def _expire(self) -> None:
        if not self._ended:
            self._finish(_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            self._stream.send_cancel(self.call_id)

    def _fall_back(self, stub: worker_pb2_grpc.DecodeStub) -> None:
        """The worker has no GenerateStream: send this call on its own (nothing was received yet)."""
        self._timer.cancel()
        left = max(0.001, self._expires - asyncio.get_running_loop().time())
        self._inner = stub.Generate(self.request, timeout=left)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Stream:
    """One open `GenerateStream` RPC: its calls by id and the frames waiting to be written."""

    def __init__(self, client: "DecodeStreamClient") -> None:
        self.client = client
        self.calls: dict[int, StreamedCall] = {}
        self._outbox: list[worker_pb2.DecodeStreamFrame] = []
        self._wake: Optional[asyncio.Future] = None
        self._closed = False
        self._ending = False
        self.retired = False
        """No new calls: the stream half-closes once its calls are done (a draining worker)."""
        self.rpc = client.stub.GenerateStream(self._frames())
        self._reader = asyncio.create_task(self._read(), name=f"decode-stream-{client.address}")

    def send(self, frame: worker_pb2.DecodeStreamFrame) -> None:
        self._outbox.append(frame)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def send_cancel(self, call_id: int) -> None:
        if not self._closed and not self._ending:
            self.send(worker_pb2.DecodeStreamFrame(call_id=call_id, cancel=True))

    def retire(self) -> None:
        """Take no new calls; half-close once the calls in flight are done, so the worker's
        side ends the RPC (a draining server then stops without waiting out its grace)."""
        self.retired = True
        self.client.stream_closed(self)
        if not self.calls:
            self.half_close()

    def half_close(self) -> None:
        self._ending = True
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _frames(self):
        """The request side: every frame ready when the writer wakes goes in one message."""
        while not self._closed and not (self._ending and not self._outbox):
            if not self._outbox:
                self._wake = asyncio.get_running_loop().create_future()
                await self._wake
                self._wake = None
                continue
            outbox, size, cut = self._outbox, 0, 0
            while cut < len(outbox) and (cut == 0 or size < MAX_FRAMES_BYTES):
                size += outbox[cut].ByteSize()
                cut += 1
            frames, self._outbox = outbox[:cut], outbox[cut:]
            yield worker_pb2.DecodeStreamFrames(frames=frames)

    async def _read(self) -> None:
        error: grpc.aio.AioRpcError
        try:
            async for message in self.rpc:
                calls = self.calls
                for event in message.events:
                    call = calls.get(event.call_id)
                    if call is None:
                        continue  # cancelled or timed out here already
                    if event.end:
                        call._end(event)
                    else:
                        call._deliver(event.response)
            error = _rpc_error(grpc.StatusCode.UNAVAILABLE, f"decode worker {self.client.address} closed its stream")
        except grpc.aio.AioRpcError as failed:
            error = failed
        except asyncio.CancelledError:
            error = _rpc_error(grpc.StatusCode.CANCELLED, "the router closed the decode stream")
        except Exception as failed:  # a broken message: the calls fail, the next call opens a new stream
            error = _rpc_error(grpc.StatusCode.INTERNAL, f"decode stream failed: {type(failed).__name__}: {failed}")
        self.close(error)

    def close(self, error: grpc.aio.AioRpcError) -> None:
        """End the stream: its calls fail with `error` (or fall back to separate calls)."""
        if self._closed:
            return
        self._closed = True
        self.client.stream_closed(self)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        self.rpc.cancel()
        calls, self.calls = list(self.calls.values()), {}
        if error.code() is grpc.StatusCode.UNIMPLEMENTED:
            self.client.supported = False
            for call in calls:
                call._fall_back(self.client.stub)
            return
        for call in calls:
            call._finish(error)


class DecodeStreamClient:
    """A decode worker's `Generate` calls, multiplexed on one stream (see the module doc)."""

    def __init__(self, address: str, stub: worker_pb2_grpc.DecodeStub) -> None:
        self.address, self.stub = address, stub
        self.supported = True
        """False once the worker answered UNIMPLEMENTED: separate calls from then on."""
        self._stream: Optional[_Stream] = None
        self._ids = itertools.count(1)
        self.streams_opened = 0

    def generate(self, request: worker_pb2.DecodeRequest, timeout: float):
        """Start a call: a `StreamedCall`, or a separate `grpc.aio` call when unsupported."""
        if not self.supported:
            return self.stub.Generate(request, timeout=timeout)
        stream = self._stream
        if stream is None:
            stream = self._stream = _Stream(self)
            self.streams_opened += 1
        call = StreamedCall(stream, next(self._ids), request, timeout)
        stream.calls[call.call_id] = call
        stream.send(worker_pb2.DecodeStreamFrame(call_id=call.call_id, start=request))
        return call

    def stream_closed(self, stream: _Stream) -> None:
        if self._stream is stream:
            self._stream = None

    def retire_stream(self) -> None:
        """The worker is draining or stopped serving: new calls open a new stream, and the
        current one ends once its calls are done (without this a draining worker's server
        would wait out its whole grace period for the idle stream)."""
        if self._stream is not None:
            self._stream.retire()

    def close(self) -> None:
        """Fail the calls in flight (the worker was removed)."""
        if self._stream is not None:
            self._stream.close(_rpc_error(grpc.StatusCode.CANCELLED, f"decode worker {self.address} was removed"))

    @property
    def open_calls(self) -> int:
        return len(self._stream.calls) if self._stream is not None else 0
