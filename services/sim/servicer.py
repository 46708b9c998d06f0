"""The gRPC services of a simulated worker: `baton.v1.Decode` and `baton.v1.Prefill`.

A request's life on a simulated decode worker (`Generate`), as on a real one:
1. admission (DRAINING / OVERLOADED before it holds anything), then a running slot;
2. KV blocks: the cached pages of the prompt are shared, the rest allocated (evicting);
3. prefill: locally (`prefill_s(uncached, cached)` of the timing model), or, when the router
   names a prefill worker, by calling its `Prefill.Prefill` with a `KVDestination` for the
   pages decode lacks, whose answer carries the first token after the modelled transfer;
4. the prompt's pages are cached (KV events go out), the first token is streamed, then one
   token per decode step (`step_s(batch, context)`), each a deterministic function of the
   context (services/sim/tokens.py), up to max_tokens (default `sim_default_max_tokens`);
5. the final chunk carries usage (cached_tokens from the cache), the output's whole pages are
   cached and the blocks released.
A migrated stream (`DecodeRequest.resume`: the tokens already sent) is served decode-only:
those tokens join the context as output (max_tokens counts them) and only the rest is
streamed, so the continuation is exactly what the first worker would have sent. One
completion per request (n > 1 is refused with INVALID_REQUEST). A cancelled call (the router gave up, or `Abort`) releases
   everything the same way.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Optional

import grpc

from baton.protos.baton.v1 import common_pb2, kv_pb2, worker_pb2, worker_pb2_grpc
from baton.protos.cluster_auth import open_channel
from baton.protos.errors import BatonError, ErrorCode, ErrorOrigin, abort_with, error_from_rpc
from baton.services.common.decode_stream import DecodeStreamServer
from baton.services.sim.tokens import TokenStream


def _max_tokens(params: common_pb2.SamplingParams, default: int) -> int:
    return max(1, params.max_tokens) if params.HasField("max_tokens") else default


def _deadline(timeout_ms: int) -> Optional[float]:
    return time.monotonic() + timeout_ms / 1000 if timeout_ms else None


class SimDecodeServicer(worker_pb2_grpc.DecodeServicer):
    """Streams deterministic tokens at the pace of the timing model."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.decode_streams = DecodeStreamServer(self.Generate)
        """The router's multiplexed streams (`GenerateStream`); `close` is the server's stop hook."""

    async def Generate(self, request: worker_pb2.DecodeRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.DecodeResponse]:
        w, rid = self.worker, request.request_id
        arrived = time.monotonic()
        try:
            w.admit(rid)
            await w.freeze_point()
            if request.params.n > 1:
                raise BatonError(ErrorCode.INVALID_REQUEST, "the simulated worker serves one completion (n == 1)")
            prompt = list(request.prompt_token_ids)
            already = list(request.resume[0].output_token_ids) if request.resume else []
            max_tokens = _max_tokens(request.params, w.config.sim_default_max_tokens)
            deadline = _deadline(request.timeout_ms)
            await w.acquire_slot(len(prompt))
            try:
                allocation = await w.allocate(prompt + already, max_tokens - len(already), deadline)
                try:
                    async for chunk in self._generate(rid, prompt, already, max_tokens, allocation, request,
                                                      arrived):
                        yield chunk
                finally:
                    await w.free(allocation)
            finally:
                w.release_slot()
        except BatonError as error:
            await abort_with(context, error)
        except asyncio.CancelledError:
            if not w.dead:
                raise
            await w.died(context)
        finally:
            w.forget(rid)

    async def GenerateStream(self, request_iterator, context) -> AsyncIterator[worker_pb2.DecodeStreamEvents]:
        """Many `Generate` calls on one stream (the router's data plane, services/common/decode_stream.py)."""
        async for events in self.decode_streams.serve(request_iterator, context):
            yield events

    async def _generate(self, rid: str, prompt: list[int], already: list[int], max_tokens: int, allocation,
                        request, arrived: float) -> AsyncIterator[worker_pb2.DecodeResponse]:
        w, timing = self.worker, self.worker.timing
        cached = min(allocation.cached_tokens, len(prompt))
        context = prompt + already
        context_len = len(context)
        w.running_tokens += context_len
        try:
            if request.prefill_address and not already:
                await self._remote_prefill(request, prompt, cached)
            else:
                await w.sleep(timing.prefill_s(len(context) - allocation.cached_tokens, allocation.cached_tokens))
            w.kv.store(allocation, context)
            stream = TokenStream(context, w.config.sim_vocab, w.config.sim_seed)
            output: list[int] = list(already)
            last = time.monotonic()
            w.observe_ttft(last - arrived)
            if len(output) >= max_tokens or (request.resume and request.resume[0].finished):
                yield worker_pb2.DecodeResponse(request_id=rid, finish_reason="length", usage=common_pb2.Usage(
                    prompt_tokens=len(prompt), completion_tokens=len(output), cached_tokens=cached))
                return
            for i in range(len(output), max_tokens):
                if i > len(already):
                    await w.sleep(timing.step_s(w.running, w.running_tokens))
                    now = time.monotonic()
                    w.observe_itl(now - last)
                    last = now
                token = stream.next()
                output.append(token)
                w.running_tokens += 1
                context_len += 1
                chunk = worker_pb2.DecodeResponse(request_id=rid, token_ids=[token], text=f" t{token}")
                if i == max_tokens - 1:
                    chunk.finish_reason = "length"
                    chunk.usage.CopyFrom(common_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=len(output),
                                                          cached_tokens=cached))
                    w.kv.store(allocation, prompt + output)
                    w.completed += 1
                yield chunk
        finally:
            w.running_tokens -= context_len

    async def _remote_prefill(self, request: worker_pb2.DecodeRequest, prompt: list[int], cached: int) -> None:
        """Have the named prefill worker compute the pages this worker lacks."""
        w = self.worker
        page = w.kv.block_size
        missing = w.kv.blocks_for(len(prompt)) - cached // page
        destination = kv_pb2.KVDestination(rendezvous_id=request.request_id, peer=w.transfer_peer(),
                                           start_token=cached, block_ids=list(range(missing)))
        channel = self._channels.get(request.prefill_address)
        if channel is None:
            channel = self._channels[request.prefill_address] = open_channel(request.prefill_address,
                                                                             w.server.credentials)
        timeout = request.timeout_ms / 1000 if request.timeout_ms else 60.0
        try:
            await worker_pb2_grpc.PrefillStub(channel).Prefill(worker_pb2.PrefillRequest(
                request_id=request.request_id, prompt_token_ids=prompt, params=request.params,
                destination=destination, timeout_ms=request.timeout_ms), timeout=timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error, default=ErrorCode.PREFILL_FAILED).with_origin(ErrorOrigin.PREFILL) from None

    async def Abort(self, request: worker_pb2.AbortRequest, context) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse(found=self.worker.abort(request.request_id))

    async def Info(self, request: worker_pb2.WorkerInfoRequest, context) -> worker_pb2.WorkerInfo:
        await self.worker.freeze_point()
        return self.worker.info()


class SimPrefillServicer(worker_pb2_grpc.PrefillServicer):
    """Computes prompts (in modelled time) and 'pushes' their KV (in modelled time)."""

    def __init__(self, worker) -> None:
        self.worker = worker

    async def Prefill(self, request: worker_pb2.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.PrefillResponse:
        w, rid = self.worker, request.request_id
        try:
            w.admit(rid)
            await w.freeze_point()
            prompt = list(request.prompt_token_ids)
            await w.acquire_slot(len(prompt))
            try:
                return await self._prefill(request, prompt)
            finally:
                w.release_slot()
        except BatonError as error:
            await abort_with(context, error)
        except asyncio.CancelledError:
            if not w.dead:
                raise
            await w.died(context)
        finally:
            w.forget(rid)

    async def _prefill(self, request: worker_pb2.PrefillRequest, prompt: list[int]) -> worker_pb2.PrefillResponse:
        w, timing = self.worker, self.worker.timing
        started = time.monotonic()
        allocation = await w.allocate(prompt, 0, _deadline(request.timeout_ms))
        w.running_tokens += len(prompt)
        try:
            cached = allocation.cached_tokens
            await w.sleep(timing.prefill_s(len(prompt) - cached, cached))
            w.kv.store(allocation, prompt)
            destination = request.destination
            num_bytes = len(destination.block_ids) * w.kv.block_size * timing.kv_bytes_per_token
            await w.sleep(timing.transfer_s(num_bytes))
        finally:
            w.running_tokens -= len(prompt)
            await w.free(allocation)
        w.observe_ttft(time.monotonic() - started)
        w.completed += 1
        first = TokenStream(prompt, w.config.sim_vocab, w.config.sim_seed).peek()
        return worker_pb2.PrefillResponse(
            request_id=request.request_id, first_token_id=first, cached_tokens=cached,
            handoff=kv_pb2.KVHandoff(
                rendezvous_id=destination.rendezvous_id, source_worker=w.address,
                destination_worker=destination.peer.worker_id, source_epoch=w.epoch,
                destination_epoch=destination.peer.epoch, block_ids=destination.block_ids,
                layout=destination.peer.layout, backend=destination.peer.backend, bytes_transferred=num_bytes))

    async def Abort(self, request: worker_pb2.AbortRequest, context) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse(found=self.worker.abort(request.request_id))

    async def Info(self, request: worker_pb2.WorkerInfoRequest, context) -> worker_pb2.WorkerInfo:
        await self.worker.freeze_point()
        return self.worker.info()
