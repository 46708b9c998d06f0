"""Runs an engine in its own thread and bridges it to asyncio code (the gRPC servicers).

The engine is single-threaded by design. This thread owns it: between steps it runs the
commands asyncio code submitted (`call`), then steps while there is work, and delivers
every `RequestDelta` to the asyncio queue of its request (`open_stream`): a step's deltas
go over in one `call_soon_threadsafe` (one wake-up of the loop per step, not per token). A
failing step fails every open stream with the error instead of killing the service. Every
`stats_interval_s` it logs a line of what it did (step_stats.StepStats).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, Callable, Optional

from baton.services.engine.request import RequestDelta
from baton.services.worker.step_stats import StepStats

log = logging.getLogger(__name__)


class StreamClosed(Exception):
    """Delivered into a stream when the engine thread fails or stops."""


class EngineThread:
    """Owns an engine; `await call(fn)` runs fn(engine) on the engine thread."""

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop, idle_wait_s: float = 0.05,
                 stats_interval_s: float = 0.0, step_seconds: Any = None, scheduled_tokens: Any = None) -> None:
        """`stats_interval_s`, `step_seconds` and `scheduled_tokens`: see `StepStats` (a log line every so
        many seconds; a Prometheus histogram and the (prefill, decode) token counters it feeds)."""
        self.engine = engine
        self.loop = loop
        self.idle_wait_s = idle_wait_s
        self._commands: queue.Queue[tuple[Callable[[Any], Any], asyncio.Future]] = queue.Queue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.steps = 0
        self.step_stats = StepStats(stats_interval_s, step_seconds=step_seconds, scheduled_tokens=scheduled_tokens)
        self._busy_since: Optional[float] = None
        """monotonic time the current step or command began; None between them."""

    def stuck_for(self, now: float) -> float:
        """Seconds the engine has spent in its current step or command (0 when between them):
        how a watchdog tells a wedged engine (one step for minutes) from a busy one."""
        started = self._busy_since
        return 0.0 if started is None else max(0.0, now - started)

    def start(self) -> None:
        """Start stepping."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; open streams receive StreamClosed."""
        self._stopped.set()
        self._commands.put((lambda engine: None, None))  # wake it
        self._thread.join(timeout)
        self._fail_streams(StreamClosed("the engine stopped"))

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(engine) between two steps and return its result (exceptions propagate)."""
        if self._stopped.is_set():
            raise StreamClosed("the engine stopped")
        future = self.loop.create_future()
        self._commands.put((fn, future))
        return await future

    def submit(self, fn: Callable[[Any], Any]) -> None:
        """Run fn(engine) between two steps without waiting (safe in cleanup paths)."""
        self._commands.put((fn, None))

    def open_stream(self, request_id: str) -> asyncio.Queue:
        """A queue that receives this request's deltas (open it before adding the request)."""
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    def close_stream(self, request_id: str) -> None:
        """Stop delivering deltas for a request."""
        self._streams.pop(request_id, None)

    def has_streams(self) -> bool:
        """True while any request stream is open."""
        return bool(self._streams)

    @property
    def open_streams(self) -> int:
        """How many request streams are open."""
        return len(self._streams)

    def fail_streams(self, error: BaseException) -> None:
        """Deliver `error` into every open stream (a drain handing its requests back)."""
        self._fail_streams(error)

    # --- the thread ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped.is_set():
            busy = self.engine.has_unfinished()
            self._run_commands(block=not busy)
            if self._stopped.is_set() or not self.engine.has_unfinished():
                continue
            try:
                self._busy_since = started = time.monotonic()
                deltas = self.engine.step()
                self.steps += 1
            except Exception as error:  # keep serving: fail what was running
                log.exception("engine step failed")
                self._abort_all()
                self._fail_streams(error)
                continue
            finally:
                self._busy_since = None
            if deltas:
                self._hand_over(deltas)
            if self.step_stats.recording:
                self._count_step(time.monotonic() - started, len(deltas))

    def _count_step(self, seconds: float, deltas: int) -> None:
        """Feed the step to the stats (line and metrics); a failure there costs the stats, never the thread."""
        try:
            self.step_stats.record_step(seconds, getattr(self.engine, "last_schedule", ()), deltas)
            self.step_stats.maybe_log(self.engine)
        except Exception:  # noqa: BLE001 - stats are best effort
            log.exception("engine stats failed; stats are off from now on")
            self.step_stats = StepStats(0.0)

    def _run_commands(self, block: bool) -> None:
        try:
            fn, future = self._commands.get(timeout=self.idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run_one(fn, future)
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run_one(self, fn: Callable[[Any], Any], future: Optional[asyncio.Future]) -> None:
        self._busy_since = started = time.monotonic()
        try:
            result, error = fn(self.engine), None
        except Exception as exc:  # returned to the caller, not fatal here
            result, error = None, exc
        finally:
            self._busy_since = None
        if self.step_stats.recording:
            self.step_stats.record_command(time.monotonic() - started)
        if future is not None:
            self.loop.call_soon_threadsafe(_settle, future, result, error)

    def _hand_over(self, deltas: list[RequestDelta]) -> None:
        """Give one step's deltas to the loop: one wake-up for all of them."""
        self.loop.call_soon_threadsafe(self._deliver_all, deltas)

    def _deliver_all(self, deltas: list[RequestDelta]) -> None:
        """On the loop: put one step's deltas into their streams (a stream closed since is skipped)."""
        streams = self._streams
        for delta in deltas:
            stream = streams.get(delta.parent_id)
            if stream is not None:
                stream.put_nowait(delta)

    def _deliver(self, request_id: str, item: RequestDelta | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self.loop.call_soon_threadsafe(stream.put_nowait, item)

    def _fail_streams(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self._deliver(request_id, error)

    def _abort_all(self) -> None:
        for request_id in list(self._streams):
            try:
                self.engine.abort(request_id)
            except Exception:  # best effort after a failed step
                log.exception("abort after failed step")


def _settle(future: asyncio.Future, result: Any, error: Optional[BaseException]) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
