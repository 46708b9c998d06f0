"""The prefill worker's gRPC service.

A request's life through prefill (`Prefill.Prefill`, called by a decode worker):
1. Admission and a handshake with the decode worker named in the `KVDestination`
   (transfer descriptor: epoch and KV layout; a restarted decode, seen as a new epoch, is
   re-handshaked; a different layout fails with LAYOUT_MISMATCH before any compute).
2. The prompt joins the local engine as a one-token request whose blocks are held after it
   finishes: the engine matches its own prefix cache, computes only the uncached part
   (chunked) and samples the first token (respecting the request's grammar and seed).
3. The blocks for the pages decode lacks (from `start_token` on) are written straight into
   decode's blocks through the transfer engine, with the rendezvous id as notification.
4. The lease on the blocks ends (they stay in the prefix cache) and the answer carries
   the first token, its logprobs, the hand-off record and the bytes moved.
Every wait is bounded: the request's timeout covers compute and transfer.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc

from baton.protos.baton.v1 import kv_pb2, worker_pb2, worker_pb2_grpc
from baton.protos.errors import BatonError, ErrorCode, abort_with
from baton.services.prefill import images as prefill_images
from baton.services.transfer.base import LayoutMismatch, PeerDescriptor, TransferError, TransferState
from baton.services.worker.params_codec import sampling_params_from_proto
from baton.services.worker.wire import logprob_to_proto
from baton.services.worker.worker_main import WorkerService
from baton.services.worker.worker_runtime import WorkerRuntime


class PrefillServicer(worker_pb2_grpc.PrefillServicer):
    """Computes prompts and pushes their KV blocks to decode workers."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    async def Prefill(self, request: worker_pb2.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.PrefillResponse:
        runtime = self.runtime
        try:
            runtime.check_accepting()
            response = await self._prefill(request)
            runtime.metrics.requests.labels(role="prefill", status="ok").inc()
            return response
        except BatonError as error:
            runtime.metrics.requests.labels(role="prefill", status=error.code_name.lower()).inc()
            await abort_with(context, error)

    async def _prefill(self, request: worker_pb2.PrefillRequest) -> worker_pb2.PrefillResponse:
        runtime, thread, transfer = self.runtime, self.runtime.thread, self.runtime.transfer
        rid = request.request_id
        params = sampling_params_from_proto(request.params)
        if params.n != 1:
            raise BatonError(ErrorCode.INVALID_REQUEST, "prefill serves one completion per request (n == 1)")
        first_only = dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))
        await runtime.grammars.prepare(params)  # compiled off the engine thread, within limits
        timeout = request.timeout_ms / 1000 if request.timeout_ms else runtime.config.prefill_timeout_s
        deadline = time.monotonic() + timeout
        destination = request.destination
        peer = PeerDescriptor.from_proto(destination.peer)
        try:
            await asyncio.to_thread(transfer.connect, peer)
        except LayoutMismatch as error:
            raise BatonError(ErrorCode.LAYOUT_MISMATCH, str(error)) from None
        except TransferError as error:
            raise BatonError(ErrorCode.TRANSFER_FAILED, f"handshake with {peer.worker_id} failed: {error}") from None
        stream = thread.open_stream(rid)
        try:
            try:
                await prefill_images.add_request(runtime, rid, request, first_only, deadline)
            except ValueError as error:
                raise BatonError(ErrorCode.INVALID_REQUEST, str(error)) from None
            delta = await _first_delta(stream, deadline)
            blocks = await thread.call(lambda e: e.held_blocks(rid))
            source = blocks[destination.start_token // runtime.engine_config.page_size:]
            if len(source) != len(destination.block_ids):
                raise BatonError(ErrorCode.INVALID_REQUEST, f"decode offered {len(destination.block_ids)} blocks "
                                 f"for {len(source)} pages")
            handle = await asyncio.to_thread(transfer.write, peer.worker_id, destination.rendezvous_id or rid,
                                             list(zip(source, destination.block_ids)),
                                             max(0.001, deadline - time.monotonic()))
            if handle.state is not TransferState.SUCCESS:
                runtime.metrics.transfer_failures.labels(role="prefill", backend=runtime.config.transfer).inc()
                runtime.transfer_failures += 1
                raise BatonError(ErrorCode.TRANSFER_FAILED, f"KV write to {peer.worker_id} failed: {handle.error}")
            runtime.metrics.transfer_bytes.labels(role="prefill", backend=runtime.config.transfer,
                                                  direction="out").inc(handle.bytes)
            runtime.metrics.transfer_seconds.labels(role="prefill", backend=runtime.config.transfer).observe(
                handle.elapsed_s)  # the write alone, not the prompt's compute
        finally:
            thread.close_stream(rid)
            thread.submit(lambda e: e.abort(rid))  # ends the lease; a no-op for a finished request
        response = worker_pb2.PrefillResponse(
            request_id=rid, first_token_id=delta.new_token_ids[0], cached_tokens=delta.num_cached_tokens,
            handoff=kv_pb2.KVHandoff(
                rendezvous_id=destination.rendezvous_id or rid, source_worker=runtime.worker_id, destination_worker=peer.worker_id,
                source_epoch=transfer.epoch, destination_epoch=peer.epoch, block_ids=destination.block_ids,
                layout=destination.peer.layout, backend=destination.peer.backend, bytes_transferred=handle.bytes))
        if delta.new_logprobs:
            response.first_logprob.CopyFrom(logprob_to_proto(delta.new_logprobs[0]))
        return response

    async def Abort(self, request: worker_pb2.AbortRequest, context) -> worker_pb2.AbortResponse:
        return await self.runtime.abort(request.request_id)

    async def Info(self, request: worker_pb2.WorkerInfoRequest, context) -> worker_pb2.WorkerInfo:
        return self.runtime.info()

    async def close(self) -> None:
        """Nothing to release: prefill dials no peer over gRPC."""


SERVICE = WorkerService(worker_pb2.PREFILL, PrefillServicer, worker_pb2_grpc.add_PrefillServicer_to_server)
"""What `baton serve prefill` runs."""


async def _first_delta(stream: asyncio.Queue, deadline: float):
    try:
        item = await asyncio.wait_for(stream.get(), max(0.001, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise BatonError(ErrorCode.DEADLINE_EXCEEDED, "prefill did not finish within the request's timeout") from None
    if isinstance(item, BatonError):  # handed back by a drain past its limit
        raise item
    if isinstance(item, BaseException):
        raise BatonError(ErrorCode.INTERNAL, f"the engine failed: {item}")
    if item.error:
        raise BatonError(ErrorCode.INVALID_REQUEST, item.error)
    return item
