"""The decode worker's gRPC service.

A request's life through decode (`Decode.Generate`):
1. Admission: refused with NOT_READY / DRAINING / OVERLOADED / INVALID_REQUEST before it
   holds anything.
2. Decode-only path (no `prefill_address`, n > 1, or prompt logprobs asked for: prefill
   hands over KV and one token, not the logits of every prompt position): the request joins
   the local engine, which prefills it itself (chunked, with its own prefix cache). A
   migrated stream (`resume`: the tokens each completion already sent) takes this path too:
   the engine replays those tokens as output (grammar, penalties, seed, stop strings) and
   computes their KV with the prompt's.
3. Disaggregated path: `reserve` matches the local prefix cache and allocates blocks for
   the rest of the prompt; decode calls `Prefill.Prefill` on the named prefill worker with
   a `KVDestination` (this worker's transfer descriptor, the first uncached token and the
   block ids to fill). Prefill writes the missing KV straight into those blocks and
   answers with the first token. Decode checks the transfer landed, `activate`s the
   request (first token through the normal output path) and it joins the running batch.
   Any failure before that frees the reservation and fails the RPC with a typed error
   (PREFILL_FAILED, TRANSFER_FAILED, LAYOUT_MISMATCH, ...) so the router can retry.
4. Streaming: token ids and text deltas per completion, usage on each final chunk; the
   client cancelling or the deadline passing aborts the request in the engine.
"""
from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import AsyncIterator, Optional, Sequence

import grpc

from baton.protos.baton.v1 import kv_pb2, worker_pb2, worker_pb2_grpc
from baton.protos.cluster_auth import open_channel
from baton.protos.errors import BatonError, ErrorCode, ErrorOrigin, abort_with, error_from_rpc
from baton.services.common.decode_stream import DecodeStreamServer
from baton.services.decode import images as decode_images
from baton.services.engine.request import RequestDelta
from baton.services.engine.sampling_params import SamplingParams
from baton.services.transfer.base import TransferState
from baton.services.worker.params_codec import invalid_request, sampling_params_from_proto
from baton.services.worker.wire import delta_to_proto, logprob_from_proto, resume_from_proto
from baton.services.worker.worker_main import WorkerService
from baton.services.worker.worker_runtime import WorkerRuntime


class DecodeServicer(worker_pb2_grpc.DecodeServicer):
    """Streams completions; pulls prompt KV from prefill workers when told to."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.decode_streams = DecodeStreamServer(self.Generate)
        """The router's multiplexed streams (`GenerateStream`); `close` is the server's stop hook."""

    async def Generate(self, request: worker_pb2.DecodeRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.DecodeResponse]:
        rid = request.request_id or uuid.uuid4().hex
        thread = None
        finished = False
        try:
            self.runtime.check_accepting()
            params = sampling_params_from_proto(request.params)
            await self.runtime.grammars.prepare(params)  # compiled off the engine thread, within limits
            prompt, images = await decode_images.expand(self.runtime, list(request.prompt_token_ids), request)
            deadline = time.monotonic() + request.timeout_ms / 1000 if request.timeout_ms else None
            thread = self.runtime.thread
            stream = thread.open_stream(rid)
            started = time.monotonic()
            counts = [0] * params.n
            done = [False] * params.n
            resume = resume_from_proto(request.resume)  # a migrated stream: served here, decode-only
            for entry in resume:
                if entry.index < params.n:
                    counts[entry.index], done[entry.index] = len(entry.output_token_ids), entry.finished
            if request.prefill_address and params.n == 1 and params.prompt_logprobs is None and not resume:
                delta = await self._disaggregated(rid, prompt, params, request, deadline, images)
                yield self._chunk(delta, counts, done, started)
            elif images:
                await decode_images.add_request(self.runtime, rid, prompt, params, images, request, deadline, resume)
            else:
                await _engine_call(thread, lambda e: e.add_request(rid, prompt, params, resume=resume))
            while not all(done):
                delta = await _next(stream, deadline)
                yield self._chunk(delta, counts, done, started)
            finished = True
            self.runtime.metrics.requests.labels(role="decode", status="ok").inc()
        except BatonError as error:
            self.runtime.metrics.requests.labels(role="decode", status=error.code_name.lower()).inc()
            await abort_with(context, error)
        finally:
            if thread is not None:
                thread.close_stream(rid)
                if not finished:
                    thread.submit(lambda e: e.abort(rid))

    async def GenerateStream(self, request_iterator, context) -> AsyncIterator[worker_pb2.DecodeStreamEvents]:
        """Many `Generate` calls on one stream (the router's data plane, services/common/decode_stream.py)."""
        async for events in self.decode_streams.serve(request_iterator, context):
            yield events

    def _chunk(self, delta: RequestDelta, counts: list[int], done: list[bool],
               started: float) -> worker_pb2.DecodeResponse:
        if counts[delta.index] == 0 and delta.new_token_ids:
            self.runtime.metrics.ttft.observe(time.monotonic() - started)
        counts[delta.index] += len(delta.new_token_ids)
        self.runtime.metrics.tokens.inc(len(delta.new_token_ids))
        if delta.finish_reason is not None:
            done[delta.index] = True
            if delta.error:
                raise invalid_request(delta.error)
        return delta_to_proto(delta, completion_tokens=counts[delta.index])

    async def _disaggregated(self, rid: str, prompt: list[int], params: SamplingParams,
                             request: worker_pb2.DecodeRequest, deadline: Optional[float],
                             images: Sequence[worker_pb2.ImageInput] = ()) -> RequestDelta:
        runtime = self.runtime
        thread, transfer = runtime.thread, runtime.transfer
        spans = decode_images.spans(runtime, images)
        reservation = await _engine_call(thread, lambda e: e.reserve(rid, prompt, params, images=spans))
        if reservation is None:
            raise BatonError(ErrorCode.OVERLOADED, "no KV-cache room for the prompt on this decode worker")
        started = time.monotonic()
        rendezvous = f"{rid}@{secrets.token_hex(4)}"  # per attempt: a retry here is not fenced by this one's forget
        fetch = decode_images.start_fetch(runtime, rid, images, request, deadline)
        try:
            page = runtime.engine_config.page_size
            destination = kv_pb2.KVDestination(
                rendezvous_id=rendezvous, peer=transfer.descriptor().to_proto(), start_token=reservation.cached_tokens,
                block_ids=reservation.block_ids[reservation.cached_tokens // page:])
            timeout = _remaining(deadline, runtime.config.prefill_timeout_s)
            response = await self._prefill(request.prefill_address, worker_pb2.PrefillRequest(
                request_id=rid, prompt_token_ids=prompt, params=request.params, destination=destination,
                timeout_ms=int(timeout * 1000), images=images, encoder_addresses=request.encoder_addresses), timeout)
            await decode_images.finish_fetch(fetch, spans)
            prefilled = time.monotonic()
            state = await asyncio.to_thread(transfer.wait_received, rendezvous, runtime.config.transfer_timeout_s)
            transfer.forget(rendezvous)
            if state is not TransferState.SUCCESS:
                raise BatonError(ErrorCode.TRANSFER_FAILED, f"KV for {rid} did not arrive (state {state.name})")
        except asyncio.CancelledError:  # the client went away: release without waiting
            decode_images.cancel_fetch(fetch)
            transfer.forget(rendezvous)  # fenced first: a late write of the prefill worker's must not land in freed blocks
            thread.submit(lambda e: e.cancel_reservation(rid))
            raise
        except BaseException:
            decode_images.cancel_fetch(fetch)
            transfer.forget(rendezvous)  # fenced before the blocks are freed (see TransferEngine.forget)
            # released before the error reaches the caller, so a retry finds the memory free
            await thread.call(lambda e: e.cancel_reservation(rid))
            runtime.metrics.transfer_failures.labels(role="decode", backend=runtime.config.transfer).inc()
            runtime.transfer_failures += 1
            raise
        runtime.metrics.remote_prefill.labels(role="decode").observe(prefilled - started)  # the call; the
        # transfer alone is the prefill worker's baton_kv_transfer_seconds
        runtime.metrics.transfer_bytes.labels(role="decode", backend=runtime.config.transfer,
                                              direction="in").inc(response.handoff.bytes_transferred)
        logprob, top = (logprob_from_proto(response.first_logprob) if response.HasField("first_logprob")
                        else (None, None))
        return await _engine_call(thread, lambda e: e.activate(rid, response.first_token_id, logprob, top,
                                                               remote_cached_tokens=response.cached_tokens))

    async def _prefill(self, address: str, request: worker_pb2.PrefillRequest,
                       timeout: float) -> worker_pb2.PrefillResponse:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self.runtime.credentials)
        try:
            return await worker_pb2_grpc.PrefillStub(channel).Prefill(request, timeout=timeout)
        except grpc.RpcError as error:
            # the router must blame (or wait for) the prefill worker, not this one
            failure = error_from_rpc(error, default=ErrorCode.PREFILL_FAILED)
            if failure.origin is ErrorOrigin.ENCODER:  # prefill's encoders failed, not prefill
                raise failure from None
            raise failure.with_origin(ErrorOrigin.PREFILL) from None

    async def Embed(self, request: worker_pb2.EmbedRequest, context) -> worker_pb2.EmbedResponse:
        """Pooled hidden states of each input (engine/pooling.py), on the engine thread between steps."""
        from baton.services.engine.pooling import EmbedCapacityError
        try:
            self.runtime.check_accepting()
            inputs = [list(item.token_ids) for item in request.inputs]
            pooling, normalize = request.pooling or "last", not request.skip_normalize
            deadline = time.monotonic() + request.timeout_ms / 1000 if request.timeout_ms else None
            try:
                await _engine_call(self.runtime.thread, lambda e: e.validate_embed(inputs, pooling))
                vectors = []
                for one in inputs:  # one engine call per input: generation steps run in between
                    call = self.runtime.thread.call(lambda e, one=one: e.embed([one], pooling, normalize)[0])
                    vectors.append(await asyncio.wait_for(call, _remaining(deadline, None)))
            except EmbedCapacityError as error:
                raise BatonError(ErrorCode.OVERLOADED, str(error)) from None
            except ValueError as error:
                raise BatonError(ErrorCode.INVALID_REQUEST, str(error)) from None
            except asyncio.TimeoutError:
                raise BatonError(ErrorCode.DEADLINE_EXCEEDED, "the embedding request's deadline passed") from None
            self.runtime.metrics.requests.labels(role="decode", status="ok").inc()
            return worker_pb2.EmbedResponse(
                request_id=request.request_id, prompt_tokens=sum(len(i) for i in inputs),
                embeddings=[worker_pb2.Embedding(values=v) for v in vectors])
        except BatonError as error:
            self.runtime.metrics.requests.labels(role="decode", status=error.code_name.lower()).inc()
            await abort_with(context, error)

    async def Abort(self, request: worker_pb2.AbortRequest, context) -> worker_pb2.AbortResponse:
        return await self.runtime.abort(request.request_id)

    async def Info(self, request: worker_pb2.WorkerInfoRequest, context) -> worker_pb2.WorkerInfo:
        return self.runtime.info()

    async def close(self) -> None:
        """Close the channels to prefill workers."""
        for channel in self._channels.values():
            await channel.close()


SERVICE = WorkerService(worker_pb2.DECODE, DecodeServicer, worker_pb2_grpc.add_DecodeServicer_to_server)
"""What `baton serve decode` runs."""


async def _engine_call(thread, fn):
    """Run fn on the engine thread; a ValueError (bad request) becomes INVALID_REQUEST."""
    try:
        return await thread.call(fn)
    except ValueError as error:
        raise invalid_request(str(error)) from None


async def _next(stream: asyncio.Queue, deadline: Optional[float]) -> RequestDelta:
    """The next delta of a request, within its deadline."""
    try:
        item = await asyncio.wait_for(stream.get(), _remaining(deadline, None))
    except asyncio.TimeoutError:
        raise BatonError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed") from None
    if isinstance(item, BatonError):  # the worker hands the request back (a drain past its limit)
        raise item
    if isinstance(item, BaseException):
        raise BatonError(ErrorCode.INTERNAL, f"the engine failed: {item}")
    return item


def _remaining(deadline: Optional[float], cap: Optional[float]) -> Optional[float]:
    if deadline is None:
        return cap
    left = max(0.001, deadline - time.monotonic())
    return left if cap is None else min(left, cap)
