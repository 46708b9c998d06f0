"""The router core: a request's pipeline from admission to the last streamed token.

A request's life (`RouterCore.generate`):
1. admit: refuse with OVERLOADED when `max_queued_requests` are already in flight;
2. select: the decode policy picks a decode worker; the decider sends the prompt
   decode-only when its uncached part is short (or n > 1), else the prefill policy picks a
   prefill worker whose address travels in the DecodeRequest (decode pulls the KV);
3. execute: stream `Decode.Generate` with the request's remaining deadline;
4. relay: every chunk goes to the caller; the tokens sent so far are remembered;
5. recover: a failure before the first token is retried on other workers (backoff,
   circuit breakers, up to `max_attempts`); a decode worker dying mid-stream is replaced
   by re-submitting prompt + tokens already sent to another decode worker (up to
   `max_migrations`), so the client's stream continues with no token lost or repeated.
   Only when no worker can serve does the caller get a RouterError, and fast.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator, Optional

import grpc

from baton.protos.baton.v1 import common_pb2, worker_pb2
from baton.protos.errors import BatonError, ErrorCode, error_from_rpc
from baton.router.config import RouterConfig
from baton.router.decider import DisaggDecider
from baton.router.metrics import RouterMetrics, WorkerCountersCollector
from baton.router.policies.base import make_policy
from baton.router.registry import WorkerEntry, WorkerRegistry
from baton.router.types import Chunk, Role, RouterError, RouterRequest

RETRYABLE = {ErrorCode.OVERLOADED, ErrorCode.NOT_READY, ErrorCode.DRAINING, ErrorCode.PREFILL_FAILED,
             ErrorCode.TRANSFER_FAILED, ErrorCode.LAYOUT_MISMATCH, ErrorCode.INTERNAL, ErrorCode.NO_WORKER}


class _Progress:
    """What has reached the client of one request so far."""

    def __init__(self, n: int) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.done = [False] * n
        self.last_chunk_at: Optional[float] = None

    @property
    def started(self) -> bool:
        return any(self.tokens) or any(self.done)


class RouterCore:
    """Worker selection, dispatch, retries and migration for every request."""

    def __init__(self, config: RouterConfig, tokenizer=None) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.registry = WorkerRegistry(config)
        self.metrics.registry.register(WorkerCountersCollector(lambda: list(self.registry.workers.values())))
        self.model_name = config.served_model_name or Path(config.model or "model").name
        self.tokenizer = tokenizer
        self.max_model_len = 0
        self.prefill_policy = make_policy(config.prefill_policy)
        self.decode_policy = make_policy(config.decode_policy)
        self.decider = DisaggDecider(config.decode_only_threshold)
        self.decode_prefixes = make_policy("cache_aware")
        """Approximate record of what each decode worker has cached (for the decider's estimate)."""
        self._active: dict[str, asyncio.Task] = {}
        self._in_flight = 0
        for address in config.addresses(config.prefill):
            self.registry.add(address, Role.PREFILL)
        for address in config.addresses(config.decode):
            self.registry.add(address, Role.DECODE)

    # --- life ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start health checking."""
        self.registry.start()

    async def stop(self) -> None:
        """Cancel running requests and stop health checking."""
        for task in list(self._active.values()):
            task.cancel()
        await self.registry.stop()

    async def refresh_worker_loads(self) -> None:
        """Before a metrics scrape: fresh load reports from every worker, and the health and
        breaker gauges set from them."""
        await self.registry.check_all()
        for entry in self.registry.workers.values():
            self.metrics.worker_healthy.labels(worker=entry.address, role=entry.role.value).set(int(entry.healthy))
            self.metrics.breaker_open.labels(worker=entry.address).set(int(entry.breaker.state != "closed"))

    def is_serving(self) -> bool:
        """True when at least one decode worker is healthy."""
        return self.registry.healthy_count(Role.DECODE) > 0

    def worker_statuses(self) -> list[dict]:
        """Operators' view of every worker."""
        rows = []
        for entry in self.registry.workers.values():
            load = entry.load
            rows.append({"address": entry.address, "role": entry.role.value, "healthy": entry.healthy,
                         "breaker": entry.breaker.state, "in_flight": entry.in_flight, "error": entry.last_error,
                         "load": {"running_requests": load.running_requests, "queued_requests": load.queued_requests,
                                  "running_tokens": load.running_tokens, "queued_tokens": load.queued_tokens,
                                  "kv_usage": round(load.kv_usage, 4), "prefix_hit_rate": round(load.prefix_hit_rate, 4)}})
        return rows

    async def abort(self, request_id: str) -> None:
        """Cancel a request wherever it runs (the decode worker sees the cancellation)."""
        task = self._active.get(request_id)
        if task is not None:
            task.cancel()

    # --- the pipeline --------------------------------------------------------------
    async def generate(self, request: RouterRequest) -> AsyncIterator[Chunk]:
        """Stream the request's chunks; raises RouterError when no worker can serve it."""
        if self._in_flight >= self.config.max_queued_requests:
            raise RouterError(ErrorCode.OVERLOADED, f"{self._in_flight} requests in flight; try again later")
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(self._run(request, queue))
        self._active[request.request_id] = task
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancel()
            self._active.pop(request.request_id, None)
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)

    async def _run(self, request: RouterRequest, queue: asyncio.Queue) -> None:
        try:
            await self._serve(request, queue)
            queue.put_nowait(None)
        except RouterError as error:
            queue.put_nowait(error)
        except asyncio.CancelledError:
            queue.put_nowait(RouterError(ErrorCode.ABORTED, "the request was aborted"))
            raise

    async def _serve(self, request: RouterRequest, queue: asyncio.Queue) -> None:
        started = time.monotonic()
        deadline = started + request.timeout_s
        progress = _Progress(request.n)
        failed: set[str] = set()
        attempts = migrations = 0
        backoff = self.config.retry_backoff_s
        while True:
            if time.monotonic() >= deadline:
                raise RouterError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed")
            resumed = progress.started
            decode, prefill = self._select(request, progress, failed)
            try:
                await self._stream_from(decode, prefill, request, progress, queue, deadline, started)
                decode.breaker.record_success()
                if prefill is not None:
                    prefill.breaker.record_success()
                self.metrics.e2e.observe(time.monotonic() - started)
                return
            except BatonError as error:
                blamed = self._blame(error, decode, prefill)
                failed.add(blamed.address)
                if progress.started and request.n == 1 and not all(progress.done):
                    migrations += 1
                    self.metrics.migrations.inc()
                    if migrations > self.config.max_migrations:
                        raise RouterError(error.code, f"stream failed after {migrations - 1} migrations: "
                                                      f"{error.message}") from None
                    await asyncio.sleep(min(self.config.retry_backoff_s, max(0.0, deadline - time.monotonic())))
                    continue
                if resumed or error.code not in RETRYABLE:
                    raise RouterError(error.code, error.message) from None
                attempts += 1
                self.metrics.retries.labels(reason=error.code_name.lower()).inc()
                if attempts >= self.config.max_attempts:
                    raise RouterError(error.code, f"failed on {attempts} workers; last: {error.message}") from None
                await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
                backoff *= 2

    def _select(self, request: RouterRequest, progress: _Progress,
                failed: set[str]) -> tuple[WorkerEntry, Optional[WorkerEntry]]:
        prompt = request.prompt_token_ids + (progress.tokens[0] if request.n == 1 else [])
        decodes = self.registry.candidates(Role.DECODE, failed) or self.registry.candidates(Role.DECODE)
        if not decodes:
            raise RouterError(ErrorCode.NO_WORKER, "no healthy decode worker")
        decode = self._pick(self.decode_policy, decodes, prompt, "decode")
        cached = self.decode_prefixes.matched_prefix_len(decode.address, prompt)
        self.decode_prefixes.on_dispatch(decode.view(), prompt)
        prefill = None
        prefills = self.registry.candidates(Role.PREFILL, failed)
        if self.decider.decide(prompt, cached, have_prefill=bool(prefills), n=request.n):
            prefill = self._pick(self.prefill_policy, prefills, prompt, "prefill")
        self.metrics.paths.labels(path="disaggregated" if prefill else "decode_only").inc()
        return decode, prefill

    def _pick(self, policy, entries: list[WorkerEntry], prompt: list[int], role: str) -> WorkerEntry:
        by_address = {e.address: e for e in entries}
        chosen = by_address[policy.select([e.view() for e in entries], prompt).address]
        chosen.breaker.allow()
        policy.on_dispatch(chosen.view(), prompt)
        self.metrics.decisions.labels(role=role, policy=policy.name, worker=chosen.address).inc()
        return chosen

    def _blame(self, error: BatonError, decode: WorkerEntry, prefill: Optional[WorkerEntry]) -> WorkerEntry:
        """Which worker a failure counts against (its breaker records it)."""
        prefill_fault = error.code in (ErrorCode.PREFILL_FAILED, ErrorCode.TRANSFER_FAILED, ErrorCode.LAYOUT_MISMATCH)
        culprit = prefill if (prefill is not None and prefill_fault) else decode
        culprit.breaker.record_failure()
        if error.code in (ErrorCode.PREFILL_FAILED, ErrorCode.INTERNAL) and "UNAVAILABLE" in error.message:
            self.registry.mark_failed(culprit.address, error.message)
        return culprit

    async def _stream_from(self, decode: WorkerEntry, prefill: Optional[WorkerEntry], request: RouterRequest,
                           progress: _Progress, queue: asyncio.Queue, deadline: float, started: float) -> None:
        """One attempt: stream from `decode` (resuming after the tokens already sent)."""
        params = common_pb2.SamplingParams()
        params.CopyFrom(request.params)
        prompt = list(request.prompt_token_ids)
        if progress.started:  # migration: continue after what the client already has
            sent = progress.tokens[0]
            prompt += sent
            if params.HasField("max_tokens"):
                params.max_tokens = max(1, params.max_tokens - len(sent))
            params.min_tokens = max(0, params.min_tokens - len(sent))
        call = decode.decode_stub().Generate(worker_pb2.DecodeRequest(
            request_id=f"{request.request_id}-{len(progress.tokens[0])}" if progress.started else request.request_id,
            prompt_token_ids=prompt, params=params, prefill_address=prefill.address if prefill else "",
            timeout_ms=int(max(0.001, deadline - time.monotonic()) * 1000)), timeout=max(0.001, deadline - time.monotonic()))
        decode.in_flight += 1
        try:
            async for response in call:
                self._relay(response, progress, queue, started, len(request.prompt_token_ids))
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, default=ErrorCode.INTERNAL) from None
        finally:
            decode.in_flight -= 1
            call.cancel()
        if not all(progress.done):
            raise BatonError(ErrorCode.INTERNAL, "the decode stream ended before every completion finished")

    def _relay(self, response: worker_pb2.DecodeResponse, progress: _Progress, queue: asyncio.Queue,
               started: float, prompt_len: int) -> None:
        now = time.monotonic()
        if progress.last_chunk_at is None:
            self.metrics.ttft.observe(now - started)
        else:
            self.metrics.itl.observe(now - progress.last_chunk_at)
        progress.last_chunk_at = now
        progress.tokens[response.index] += list(response.token_ids)
        finished = bool(response.finish_reason)
        progress.done[response.index] = finished
        usage = None
        if finished and response.HasField("usage"):
            usage = common_pb2.Usage(prompt_tokens=prompt_len, completion_tokens=len(progress.tokens[response.index]),
                                     cached_tokens=min(prompt_len, response.usage.cached_tokens))
        queue.put_nowait(Chunk(index=response.index, token_ids=list(response.token_ids), text=response.text,
                               logprobs=list(response.logprobs), finish_reason=response.finish_reason or None,
                               stop_reason=response.stop_reason, usage=usage))
