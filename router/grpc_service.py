"""The `baton.v1.Router` gRPC service: streaming Generate over token ids or text, Abort,
ListWorkers, Health, and dynamic worker registration. API keys travel as
`authorization: Bearer KEY` metadata when the router has keys configured (router/auth.py,
the same parsing and constant-time check as HTTP); RegisterWorker / DeregisterWorker need
an admin key, and a request can be aborted only by the key that started it (or an admin)."""
from __future__ import annotations

import asyncio
import uuid

import grpc

from baton.protos.baton.v1 import router_pb2, router_pb2_grpc, worker_pb2
from baton.protos.errors import BatonError, ErrorCode, abort_with
from baton.router.auth import AuthError, Caller, identify
from baton.router.core import RouterCore
from baton.router.gateway.errors import CLIENT_CLOSED_STATUS, status_for_code
from baton.router.metrics import labelled
from baton.router.types import Role, RouterRequest
from baton.router.validation import checked_params


class RouterServicer(router_pb2_grpc.RouterServicer):
    """Thin adapter from the wire to `RouterCore`."""

    def __init__(self, core: RouterCore) -> None:
        self.core = core

    async def _authorize(self, context: grpc.aio.ServicerContext, *, admin: bool = False) -> Caller:
        """The caller (router/auth.py: `authorization: Bearer KEY`, as over HTTP); fails the
        call with UNAUTHENTICATED when a needed key is missing or wrong."""
        metadata = context.invocation_metadata() or ()
        header = next((v for k, v in metadata if k == "authorization" and isinstance(v, str)), None)
        try:
            return identify(self.core.config, header, admin=admin)
        except AuthError as error:
            await abort_with(context, error)

    async def Generate(self, request: router_pb2.GenerateRequest, context):
        caller = await self._authorize(context)
        core = self.core
        if request.model and request.model != core.model_name:
            await abort_with(context, BatonError(ErrorCode.INVALID_REQUEST, f"unknown model {request.model!r}"))
        if request.HasField("text"):
            prompt = list(await asyncio.to_thread(core.tokenizer.encode, request.text))  # off the event loop
        else:
            prompt = list(request.token_ids.ids)
        if not prompt:
            await abort_with(context, BatonError(ErrorCode.INVALID_REQUEST, "the prompt is empty", param="prompt"))
        try:  # the limits and max_tokens default HTTP applies (router/validation.py)
            params = checked_params(request.params, len(prompt), core.max_model_len)
        except BatonError as error:
            await abort_with(context, error)
        timeout = request.timeout_ms / 1000 if request.timeout_ms else core.config.request_timeout_s
        routed = RouterRequest(request_id=request.request_id or uuid.uuid4().hex, prompt_token_ids=prompt,
                               params=params, timeout_s=timeout, n=max(1, params.n), owner=caller.owner)
        status, reason, sent = 200, "", False  # HTTP's status labels: the status this outcome has on HTTP
        try:
            async for chunk in core.generate(routed):
                sent = True
                yield router_pb2.GenerateResponse(
                    request_id=routed.request_id, index=chunk.index, token_ids=chunk.token_ids, text=chunk.text,
                    logprobs=chunk.logprobs, finish_reason=chunk.finish_reason or "", stop_reason=chunk.stop_reason,
                    usage=chunk.usage, prompt_logprobs=chunk.prompt_logprobs)
        except BatonError as error:
            cancelled = error.code == ErrorCode.ABORTED
            status = CLIENT_CLOSED_STATUS if cancelled else status_for_code(error.code)
            reason = "client_closed" if cancelled else error.code_name.lower()
            await abort_with(context, error)
        except asyncio.CancelledError:  # the client went away
            status, reason = CLIENT_CLOSED_STATUS, "client_closed"
            raise
        finally:
            labelled(core.metrics.requests, "grpc", str(status)).inc()
            if sent and reason:
                labelled(core.metrics.stream_failures, "grpc", reason).inc()

    async def Abort(self, request, context) -> worker_pb2.AbortResponse:
        caller = await self._authorize(context)  # only the key that started it (or an admin) may abort it
        return worker_pb2.AbortResponse(found=await self.core.abort(request.request_id, caller))

    async def ListWorkers(self, request, context) -> router_pb2.ListWorkersResponse:
        await self._authorize(context, admin=getattr(self.core.config, "protect_admin_endpoints", False))
        workers = []
        for entry in self.core.registry.workers.values():
            workers.append(router_pb2.WorkerStatus(
                address=entry.address, role=worker_pb2.DECODE if entry.role is Role.DECODE else worker_pb2.PREFILL,
                healthy=entry.healthy, load=entry.load, breaker_state=entry.breaker.state.value))
        return router_pb2.ListWorkersResponse(workers=workers)

    async def Health(self, request, context) -> router_pb2.RouterHealthResponse:
        registry = self.core.registry
        return router_pb2.RouterHealthResponse(serving=self.core.is_serving(),
                                               healthy_prefill=registry.healthy_count(Role.PREFILL),
                                               healthy_decode=registry.healthy_count(Role.DECODE))

    async def RegisterWorker(self, request, context) -> router_pb2.RegisterWorkerResponse:
        await self._authorize(context, admin=True)
        if request.role not in (worker_pb2.PREFILL, worker_pb2.DECODE) or not request.address:
            await abort_with(context, BatonError(ErrorCode.INVALID_REQUEST, "give an address and role PREFILL or DECODE"))
        role = Role.DECODE if request.role == worker_pb2.DECODE else Role.PREFILL
        added = self.core.registry.add(request.address, role)
        await self.core.registry.check_all()
        return router_pb2.RegisterWorkerResponse(added=added)

    async def DeregisterWorker(self, request, context) -> router_pb2.DeregisterWorkerResponse:
        await self._authorize(context, admin=True)
        removed = await self.core.registry.remove(request.address)
        for policy in (self.core.prefill_policy, self.core.decode_policy, self.core.decode_prefixes):
            policy.on_worker_removed(request.address)
        return router_pb2.DeregisterWorkerResponse(removed=removed)
