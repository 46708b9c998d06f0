"""One request's pipeline inside the router, from admission to the last streamed token.

A request's life (`Pipeline.run`, in the request's own task, see router/stream.py):
1. room: the decode policy needs a healthy decode worker with room, and the prefill
   policy a prefill worker with room when the decider disaggregates. While every worker of
   a role is full the request waits in the router's `RoomQueue` (FIFO, within its
   deadline); a full queue refuses it with OVERLOADED (429). With no healthy decode worker
   at all it fails at once with NO_WORKER.
2. select: the policies pick among the workers with room; the decider sends the prompt
   decode-only when its uncached part is short (or n > 1, or the stream is resumed), else
   names the prefill worker in the DecodeRequest (decode reserves its blocks and has prefill
   write into them).
3. execute: stream `Decode.Generate` with the request's remaining deadline; each chunk is
   handed to the client's stream the moment it arrives.
4. recover:
   - OVERLOADED from a worker is backpressure, not failure: that worker gets no new work
     for `saturated_s`, the request goes back to step 1, and no breaker or attempt counts it;
   - a failure before the first token is retried on other workers (backoff, circuit
     breakers, up to `max_attempts`); a worker that could not be reached is marked unhealthy;
   - a decode worker dying mid-stream is replaced by migrating the stream (up to
     `max_migrations`): the prompt goes to another decode worker with, per completion, the
     tokens already sent (`DecodeRequest.resume`; n > 1 moves every unfinished completion).
     That worker replays them as output (grammar, penalties, seeded sampler, stop strings)
     and continues: the stream equals an unbroken one, no token lost or repeated.
   Every retry, wait and failure is logged once, with the worker and the reason, and counted
   in a metric labelled by reason. Only when no worker can serve does the caller get an
   error, and it gets it fast.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

import grpc

from baton.protos.baton.v1 import common_pb2, worker_pb2
from baton.protos.errors import BatonError, ErrorCode, ErrorOrigin, error_from_rpc
from baton.router.admission import RoomQueue
from baton.router.breaker import BreakerState
from baton.router.metrics import labelled
from baton.router.registry import WorkerEntry
from baton.router.stream import Emit
from baton.router.types import Chunk, Role, RouterRequest

log = logging.getLogger(__name__)

RETRYABLE = {ErrorCode.NOT_READY, ErrorCode.DRAINING, ErrorCode.PREFILL_FAILED, ErrorCode.TRANSFER_FAILED,
             ErrorCode.LAYOUT_MISMATCH, ErrorCode.INTERNAL, ErrorCode.NO_WORKER}
"""Failures before the first token that another worker may not have."""
PREFILL_FAULTS = {ErrorCode.PREFILL_FAILED, ErrorCode.TRANSFER_FAILED, ErrorCode.LAYOUT_MISMATCH}
CLIENTS_OWN = {ErrorCode.INVALID_REQUEST, ErrorCode.ABORTED, ErrorCode.DEADLINE_EXCEEDED}
"""Failures of the request itself: no worker is blamed and moving the stream would not help."""


class Progress:
    """What has reached the client of one request so far."""

    def __init__(self, n: int) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.done = [False] * n
        self.last_chunk_at: Optional[float] = None

    @property
    def started(self) -> bool:
        return any(self.tokens) or any(self.done)


def _pick(policy, entries: list[WorkerEntry], prompt: list[int]) -> WorkerEntry:
    """The entry the policy selects among `entries`."""
    address = policy.select([e.view() for e in entries], prompt).address
    return next(e for e in entries if e.address == address)


class StallWatchdog:
    """Gives up on a frozen decode worker's stream: every `check_s` (one timer per attempt, not
    a task per message) it cancels the call when nothing came for `check_s` and the worker
    turned unhealthy, or nothing came for `stall_s`; `why` then says which (the attempt
    fails, then retries or migrates)."""

    def __init__(self, call, decode: WorkerEntry, check_s: float, stall_s: float) -> None:
        self.call, self.decode, self.stall_s = call, decode, stall_s
        self.check_s = max(0.001, min(check_s, stall_s))
        self.last_message_at = time.monotonic()
        self.why = ""
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(self.check_s, self._check)

    def _check(self) -> None:
        waited = time.monotonic() - self.last_message_at
        if waited >= self.check_s and not self.decode.healthy:  # a worker still streaming is left alone
            self.why = "turned unhealthy"
        elif waited >= self.stall_s:
            self.why = f"sent nothing for {waited:.0f} s"
        if self.why:
            self._handle = None
            self.call.cancel()
            return
        self._handle = self._loop.call_later(self.check_s, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Pipeline:
    """Runs one request against the core's registry, policies and metrics."""

    def __init__(self, core, room: RoomQueue, request: RouterRequest, emit: Emit) -> None:
        self.core, self.room, self.request, self.emit = core, room, request, emit
        self.started = time.monotonic()
        self.deadline = self.started + request.timeout_s
        self.progress = Progress(request.n)
        self.failed: set[str] = set()
        self._trials: set[str] = set()
        """Workers whose half-open breaker trial this request holds."""
        self._moves = 0
        """Resumed attempts sent so far (names each one's request id on its worker)."""

    async def run(self) -> None:
        """Serve the request to the end; raises BatonError when no worker can."""
        config, metrics = self.core.config, self.core.metrics
        attempts = migrations = 0
        backoff = config.retry_backoff_s
        while True:
            resumed = self.progress.started
            decode, prefill = await self._acquire()
            refused = False
            try:
                await self._stream_from(decode, prefill)
                decode.breaker.record_success()
                if prefill is not None:
                    prefill.breaker.record_success()
                metrics.e2e.observe(time.monotonic() - self.started)
                return
            except BatonError as error:
                if error.code == ErrorCode.OVERLOADED:  # refused before this attempt sent anything
                    refused = True
                    self._backpressure(error, decode, prefill)
                    continue
                if error.origin is ErrorOrigin.ENCODER:  # the worker tried every encoder: none to blame, none left
                    raise BatonError(error.code, error.message) from None
                blamed = self._blame(error, decode, prefill)
                self.failed.add(blamed.address)
                if self.progress.started and not all(self.progress.done) and error.code != ErrorCode.INVALID_REQUEST:
                    migrations += 1
                    metrics.migrations.inc()
                    if migrations > config.max_migrations:
                        raise BatonError(error.code, f"stream failed after {migrations - 1} migrations: "
                                                     f"{error.message}") from None
                    log.warning("request %s: decode worker %s failed mid-stream (%s); migrating (%d)",
                                self.request.request_id, blamed.address, error, migrations)
                    await self._sleep(config.retry_backoff_s)
                    continue
                if resumed or error.code not in RETRYABLE:
                    raise BatonError(error.code, error.message, param=error.param) from None
                attempts += 1
                metrics.retries.labels(reason=error.code_name.lower()).inc()
                if attempts >= config.max_attempts:
                    raise BatonError(error.code, f"failed on {attempts} workers; last: {error.message}") from None
                log.warning("request %s: %s worker %s failed (%s); retrying (attempt %d)", self.request.request_id,
                            blamed.role.value, blamed.address, error, attempts + 1)
                await self._sleep(backoff)
                backoff *= 2
            finally:
                self._release(decode, prefill, refused)

    # --- room and selection --------------------------------------------------------
    async def _acquire(self) -> tuple[WorkerEntry, Optional[WorkerEntry]]:
        """Workers with room for the request, waiting in the room queue while there are none."""
        self._counted_wait = False
        chosen = None if self.room.has_waiters else self._try_select()
        if chosen is not None:
            return chosen
        with self.room.queued():
            self.core.metrics.queued.set(self.room.waiting)
            self.room.wake()  # waiters ahead of this one re-check first, in order
            try:
                while True:
                    await self.room.wait_for_change(self.deadline)
                    chosen = self._try_select()
                    if chosen is not None:
                        return chosen
            finally:
                self.core.metrics.queued.set(self.room.waiting - 1)

    def _try_select(self) -> Optional[tuple[WorkerEntry, Optional[WorkerEntry]]]:
        """Pick (decode, prefill or None) among workers with room and claim their slots;
        None when the request must wait. Raises NO_WORKER when no decode worker is alive."""
        core, now = self.core, time.monotonic()
        if time.monotonic() >= self.deadline:
            raise BatonError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed")
        registry = core.registry
        if not registry.alive(Role.DECODE):
            raise BatonError(ErrorCode.NO_WORKER, "no healthy decode worker")
        decodes = registry.candidates(Role.DECODE, self.failed) or registry.candidates(Role.DECODE)
        if not decodes:
            raise BatonError(ErrorCode.NO_WORKER, "every decode worker's circuit breaker is open")
        decodes = [e for e in decodes if e.has_room(now)]
        if not decodes:
            return self._waits(Role.DECODE, "full")
        prompt = self.request.prompt_token_ids + (self.progress.tokens[0] if self.request.n == 1 else [])
        prefills = registry.candidates(Role.PREFILL, self.failed)
        decode = _pick(core.decode_policy, decodes, prompt)
        prefill = None
        resuming = self.progress.started  # a resumed stream is served decode-only (resume.py)
        backlog = min((max(e.load.queued_tokens + e.load.running_tokens, e.prefill_tokens_in_flight)
                       for e in prefills), default=0)
        # the decider's estimate of the decode worker's cached prefix (a prompt hash): only when it can matter
        cached = core.decode_prefixes.matched_prefix_len(decode.address, prompt) if prefills and not resuming else 0
        if not resuming and core.decider.decide(prompt, cached, have_prefill=bool(prefills), n=self.request.n,
                                                prompt_logprobs=self.request.params.HasField("prompt_logprobs"),
                                                prefill_backlog_tokens=backlog):
            with_room = [e for e in prefills if e.has_room(now)]
            if not with_room:
                return self._waits(Role.PREFILL, "full")
            prefill = self._claim(core.prefill_policy, _pick(core.prefill_policy, with_room, prompt), prompt,
                                  Role.PREFILL)
        self._claim(core.decode_policy, decode, prompt, Role.DECODE)
        core.decode_prefixes.on_dispatch(decode.view(), prompt)
        labelled(core.metrics.paths, "disaggregated" if prefill else "decode_only").inc()
        return decode, prefill

    def _waits(self, role: Role, reason: str) -> None:
        """No room now: counted once per wait, not on every re-check while the request waits."""
        if not self._counted_wait:
            self._counted_wait = True
            self.core.metrics.backpressure.labels(role=role.value, reason=reason).inc()
        return None

    def _claim(self, policy, chosen: WorkerEntry, prompt: list[int], role: Role) -> WorkerEntry:
        """Take one slot of the chosen worker (released by `_release`)."""
        if chosen.breaker.state is BreakerState.HALF_OPEN:
            self._trials.add(chosen.address)
        chosen.breaker.allow()
        chosen.in_flight += 1
        policy.on_dispatch(chosen.view(), prompt)
        metrics = self.core.metrics
        labelled(metrics.decisions, role.value, policy.name, chosen.address).inc()
        return chosen

    def _release(self, decode: WorkerEntry, prefill: Optional[WorkerEntry], refused: bool) -> None:
        """Give the attempt's slots back; a request that ended (not one refused with
        OVERLOADED) frees room on its workers, so their saturation ends early."""
        for entry in (decode, prefill):
            if entry is not None:
                entry.in_flight -= 1
                if entry.address in self._trials:  # a trial with no verdict must not block the worker
                    self._trials.discard(entry.address)
                    entry.breaker.release_trial()
                if not refused:
                    entry.saturated_until = 0.0
        self.room.wake()

    # --- failures ------------------------------------------------------------------
    def _backpressure(self, error: BatonError, decode: WorkerEntry, prefill: Optional[WorkerEntry]) -> None:
        """A worker answered OVERLOADED: it is busy, not broken."""
        busy = prefill if (prefill is not None and error.origin is ErrorOrigin.PREFILL) else decode
        busy.mark_saturated(time.monotonic(), max(error.retry_after_s, self.core.config.saturated_s))
        self.core.metrics.backpressure.labels(role=busy.role.value, reason="overloaded").inc()
        log.info("request %s: %s worker %s is full (%s); waiting for room", self.request.request_id,
                 busy.role.value, busy.address, error.message)

    def _blame(self, error: BatonError, decode: WorkerEntry, prefill: Optional[WorkerEntry]) -> WorkerEntry:
        """Which worker a failure counts against (its breaker records it; unreachable: unhealthy).
        A client error (INVALID_REQUEST) or the client's own abort counts against nobody."""
        from_prefill = error.origin is ErrorOrigin.PREFILL or error.code in PREFILL_FAULTS
        culprit = prefill if (prefill is not None and from_prefill) else decode
        if error.code in CLIENTS_OWN:
            return culprit
        culprit.breaker.record_failure()
        if error.unreachable:
            self.core.registry.mark_failed(culprit.address, error.message)
        return culprit

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(min(seconds, max(0.0, self.deadline - time.monotonic())))

    # --- one attempt ---------------------------------------------------------------
    async def _stream_from(self, decode: WorkerEntry, prefill: Optional[WorkerEntry]) -> None:
        """Stream from `decode` (resuming after the tokens already sent)."""
        request, progress = self.request, self.progress
        params = request.params
        resume = []
        if progress.started:  # migration: each completion continues after what the client already has
            params = common_pb2.SamplingParams()
            params.CopyFrom(request.params)
            resume = [worker_pb2.ResumedCompletion(index=i, output_token_ids=[] if done else tokens, finished=done)
                      for i, (tokens, done) in enumerate(zip(progress.tokens, progress.done))]
            params.ClearField("prompt_logprobs")  # sent with the first chunk already
            params.prompt_logprobs_start = 0
            self._moves += 1
        left = max(0.001, self.deadline - time.monotonic())
        encoders = self.core.encoders.ranked([h for _, h in request.images]) if request.images else []
        call = decode.generate(worker_pb2.DecodeRequest(
            request_id=f"{request.request_id}-m{self._moves}" if progress.started else request.request_id,
            prompt_token_ids=request.prompt_token_ids, params=params,
            prefill_address=prefill.address if prefill else "", timeout_ms=int(left * 1000), resume=resume,
            images=[worker_pb2.ImageInput(data=d, content_hash=h) for d, h in request.images],
            encoder_addresses=encoders), left)
        watchdog = StallWatchdog(call, decode, self.core.config.health_interval_s,
                                 self.core.config.stream_stall_timeout_s)
        relay = self._relay
        pending = len(request.prompt_token_ids) if prefill is not None else 0  # prefill's backlog until a token
        if pending:
            prefill.prefill_tokens_in_flight += pending
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                watchdog.last_message_at = time.monotonic()
                if pending:
                    prefill.prefill_tokens_in_flight -= pending
                    pending = 0
                relay(response)
        except (asyncio.CancelledError, grpc.aio.AioRpcError) as error:
            task = asyncio.current_task()
            if watchdog.why and not (task is not None and task.cancelling()):
                raise BatonError(ErrorCode.INTERNAL, f"decode worker {decode.address} {watchdog.why} mid-request",
                                 unreachable=not decode.healthy) from None
            if isinstance(error, asyncio.CancelledError):
                raise
            raise error_from_rpc(error, default=ErrorCode.INTERNAL) from None
        finally:
            if pending:
                prefill.prefill_tokens_in_flight -= pending
            watchdog.stop()
            call.cancel()
        if not all(progress.done):
            raise BatonError(ErrorCode.INTERNAL, "the decode stream ended before every completion finished")

    def _relay(self, response: worker_pb2.DecodeResponse) -> None:
        now, progress, metrics = time.monotonic(), self.progress, self.core.metrics
        if progress.last_chunk_at is None:
            metrics.ttft.observe(now - self.started)
        else:
            metrics.itl.observe(now - progress.last_chunk_at)
        progress.last_chunk_at = now
        progress.tokens[response.index] += list(response.token_ids)
        finished = bool(response.finish_reason)
        progress.done[response.index] = finished
        usage = None
        prompt_len = len(self.request.prompt_token_ids)
        if finished and response.HasField("usage"):
            if self.request.images:  # the worker expanded each image placeholder: its count includes them
                prompt_len = max(prompt_len, response.usage.prompt_tokens)
            usage = common_pb2.Usage(prompt_tokens=prompt_len,
                                     completion_tokens=len(progress.tokens[response.index]),
                                     cached_tokens=min(prompt_len, response.usage.cached_tokens))
        self.emit(Chunk(index=response.index, token_ids=list(response.token_ids), text=response.text,
                        logprobs=list(response.logprobs), finish_reason=response.finish_reason or None,
                        stop_reason=response.stop_reason, usage=usage,
                        prompt_logprobs=list(response.prompt_logprobs)))
