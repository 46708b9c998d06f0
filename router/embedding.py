"""Embedding requests through the router: one `Decode.Embed` call on a decode worker.

Embeddings need the served model's hidden states, which only decode workers serve whole
(a prefill worker hands over KV, not hidden states), so every embedding request goes
decode-only. `embed(core, inputs, ...)` picks a healthy decode worker with room by the decode
policy, claims one of its slots for the call, and on a failure before an answer (unreachable,
not ready, draining, internal; counted in `baton_router_retries`) tries another, with backoff, up to
`max_attempts`; a worker that
answers OVERLOADED is left alone for `saturated_s` and the next one is tried without counting an
attempt. A bad input (INVALID_REQUEST) is the caller's and is never retried.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import grpc

from baton.protos.baton.v1 import worker_pb2
from baton.protos.errors import BatonError, ErrorCode, error_from_rpc
from baton.router.types import Role

log = logging.getLogger(__name__)

_RETRYABLE = {ErrorCode.NOT_READY, ErrorCode.DRAINING, ErrorCode.INTERNAL, ErrorCode.OVERLOADED}


@dataclass
class EmbedResult:
    """What a decode worker answered for one embedding request."""

    vectors: list[list[float]]
    prompt_tokens: int


def _choose(core, failed: set[str]):
    registry = core.registry
    if not registry.alive(Role.DECODE):
        raise BatonError(ErrorCode.NO_WORKER, "no healthy decode worker")
    now = time.monotonic()
    entries = [e for e in registry.candidates(Role.DECODE, failed) if e.has_room(now)]
    if not entries:
        entries = [e for e in registry.candidates(Role.DECODE) if e.has_room(now)]
    if not entries:
        raise BatonError(ErrorCode.OVERLOADED, "every decode worker is busy; retry later",
                         retry_after_s=core.config.retry_after_s)
    address = core.decode_policy.select([e.view() for e in entries], []).address
    return next(e for e in entries if e.address == address)


async def embed(core, inputs: list[list[int]], *, pooling: str = "last", normalize: bool = True,
                timeout_s: float) -> EmbedResult:
    """The pooled embedding of every input (token ids), from one decode worker."""
    config = core.config
    deadline = time.monotonic() + timeout_s
    request = worker_pb2.EmbedRequest(
        request_id=f"embd-{uuid.uuid4().hex}", pooling=pooling, skip_normalize=not normalize,
        inputs=[worker_pb2.EmbedInput(token_ids=ids) for ids in inputs])
    failed: set[str] = set()
    attempts, backoff = 0, config.retry_backoff_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BatonError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed")
        entry = _choose(core, failed)
        request.timeout_ms = int(left * 1000)
        entry.in_flight += 1
        try:
            response = await entry.decode_stub().Embed(request, timeout=left)
            entry.breaker.record_success()
            return EmbedResult([list(e.values) for e in response.embeddings], response.prompt_tokens)
        except grpc.RpcError as rpc_error:
            error = error_from_rpc(rpc_error)
        finally:
            entry.in_flight -= 1
        if error.code == ErrorCode.OVERLOADED:
            entry.mark_saturated(time.monotonic(), config.saturated_s)
            failed.add(entry.address)
            if len(failed) >= len(core.registry.alive(Role.DECODE)):
                raise BatonError(ErrorCode.OVERLOADED, error.message, retry_after_s=config.retry_after_s)
            continue
        if not (error.unreachable or error.code in _RETRYABLE):
            raise error
        entry.breaker.record_failure()
        if error.unreachable:  # as the pipeline does: no more work there until a health check passes
            core.registry.mark_failed(entry.address, error.message)
        failed.add(entry.address)
        attempts += 1
        core.metrics.retries.labels(reason=error.code_name.lower()).inc()
        if attempts >= config.max_attempts:
            raise BatonError(error.code, f"failed on {attempts} workers; last: {error.message}") from None
        log.warning("embedding request %s: decode worker %s failed (%s); retrying", request.request_id,
                    entry.address, error)
        await asyncio.sleep(backoff)
        backoff *= 2
