"""Compiling a request's structured-output grammar off the engine thread, with limits: `GrammarPool`.

A grammar compile (xgrammar: JSON schema, regex, EBNF) can take seconds, or minutes and
gigabytes for a hostile one. On the engine thread it would stall every running request, so a
servicer calls `await pool.prepare(params)` before it adds the request: the spec is refused
when its text is over `max_grammar_bytes`, compiled in a thread of its own, at most
`grammar_compile_threads` at once (xgrammar releases the GIL, so the engine keeps stepping
meanwhile), into the engine's compiled-grammar cache
(`Engine.grammar_cache`, an LRU keyed by the spec), and the request waits at most
`grammar_compile_timeout_s` for it (the compiler's one-time set-up on the first spec, building the
vocabulary's token table, waits outside that limit). The engine's own `add_request` then finds the grammar
cached (only a spec evicted meanwhile, by hundreds of newer ones, is compiled again there). A bad spec, a spec too large and a compile past its limit are that request's
INVALID_REQUEST (HTTP 400, `param` naming the field) and nobody else's.

A compile that runs past its limit cannot be interrupted: it keeps its thread, and its slot
of the `grammar_compile_threads` allowed at once, until it ends (its result then lands in the
cache, so the same spec is quick next time); later compiles wait for a slot within their own
time limit. The threads are daemons, so a worker that stops does not wait for them.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Optional

from baton.protos.errors import BatonError, ErrorCode
from baton.services.engine.sampling_params import SamplingParams, StructuredOutputParams

_PARAM = {"json": "response_format.json_schema", "json_object": "response_format", "regex": "regex",
          "grammar": "grammar"}
"""The request field a spec kind comes from (the OpenAI-style `param` of its error)."""


class GrammarPool:
    """Compiles structured-output specs into an engine's grammar cache, off its thread."""

    def __init__(self, engine: Any, max_bytes: int, timeout_s: float, threads: int) -> None:
        self._engine = engine
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._threads = max(1, threads)
        self._slots: Optional[asyncio.Semaphore] = None  # made in the event loop that uses it
        self._cache_ready = False

    async def prepare(self, params: SamplingParams) -> None:
        """Compile the request's grammar (if any) within the limits; BatonError(INVALID_REQUEST) if not."""
        spec = params.structured_output
        if spec is None:
            return
        kind, text = spec.key
        param = _PARAM[kind]
        size = len(text.encode())
        if size > self.max_bytes:
            raise BatonError(ErrorCode.INVALID_REQUEST, f"the structured-output spec is {size} bytes; this worker "
                                                        f"accepts at most {self.max_bytes} (--max-grammar-bytes)",
                             param=param)
        if not self._cache_ready:  # the one-time compiler set-up (the vocabulary's token table) is not the
            await asyncio.to_thread(self._engine.grammar_cache)  # request's compile: outside its time limit
            self._cache_ready = True
        try:
            await asyncio.wait_for(self._compile(spec), self.timeout_s)
        except asyncio.TimeoutError:
            raise BatonError(ErrorCode.INVALID_REQUEST, f"compiling the structured-output spec took longer than "
                                                        f"{self.timeout_s:g} s (--grammar-compile-timeout-s)",
                             param=param) from None
        except ValueError as error:  # StructuredOutputError: the spec is invalid
            raise BatonError(ErrorCode.INVALID_REQUEST, str(error), param=param) from None

    async def _compile(self, spec: StructuredOutputParams) -> None:
        """Compile in a daemon thread holding one slot until the compile ends (not until we stop waiting)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._threads)
        slots, loop = self._slots, asyncio.get_running_loop()
        await slots.acquire()
        done = loop.create_future()
        done.add_done_callback(_retrieve)

        def work() -> None:
            error: Optional[BaseException] = None
            try:
                self._engine.grammar_cache().compile(spec)
            except BaseException as exc:  # handed to the waiting request
                error = exc
            try:
                loop.call_soon_threadsafe(_finish, slots, done, error)
            except RuntimeError:  # the event loop is gone: the worker stopped meanwhile
                pass
        try:
            threading.Thread(target=work, name="grammar-compile", daemon=True).start()
        except BaseException:
            slots.release()
            raise
        await asyncio.shield(done)

    def close(self) -> None:
        """Nothing to stop: running compiles are daemon threads."""


def _finish(slots: asyncio.Semaphore, done: asyncio.Future, error: Optional[BaseException]) -> None:
    slots.release()
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(None)


def _retrieve(done: asyncio.Future) -> None:
    if not done.cancelled():
        done.exception()  # retrieved, so asyncio does not log an error nobody waits for any more
