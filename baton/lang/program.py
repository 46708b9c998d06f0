"""`@baton.function` and running programs: `Program.run` and `Program.run_batch`.

A program is a function `def program(s, **args)` that appends to the state `s`. `run(**args)`
calls it with a fresh `ProgramState`, waits for every step (within `timeout_s`) and returns
the state; a failed step raises its `ProgramError` (naming the program and the step).
`run_batch([args, ...], num_threads=, progress_bar=)` runs many programs concurrently and
returns their states in order; a program that failed does not stop the others: its state's
`error()` holds the `ProgramError`, which reading it (`s["x"]`, `text()`) raises.

The sampling arguments of `run` / `run_batch` (SGLang's names: `max_new_tokens`,
`temperature`, ...) are the defaults of every `gen` that does not set its own. A program may
call another: `other(s, ...)` appends the other's steps to the same state.
"""
from __future__ import annotations

import functools
import inspect
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

from baton.lang.backend import Backend, Sampling, get_default_backend
from baton.lang.errors import ProgramError
from baton.lang.ir import SamplingArgs
from baton.lang.state import ProgramState, deadline_after

MAX_AUTO_THREADS = 64
"""`num_threads="auto"` runs at most this many programs at once."""


class Program:
    """A function over a state, runnable against a backend."""

    def __init__(self, func: Callable[..., Any]) -> None:
        params = list(inspect.signature(func).parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise TypeError(f"a baton program takes the state as its first argument: def {func.__name__}(s, ...)")
        self.func = func
        self.name = func.__name__
        self._signature = inspect.signature(func)
        functools.update_wrapper(self, func)

    def __call__(self, state: ProgramState, *args: Any, **kwargs: Any) -> Any:
        """Run this program's steps on an existing state (a program calling another)."""
        return self.func(state, *args, **kwargs)

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> inspect.BoundArguments:
        try:
            return self._signature.bind(None, *args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{self.name}: {error}") from None

    def _state(self, backend: Optional[Backend], sampling: Sampling, timeout_s: float, label: str) -> ProgramState:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        return ProgramState(backend or get_default_backend(), sampling, deadline_after(timeout_s), label)

    def _execute(self, state: ProgramState, bound: inspect.BoundArguments) -> ProgramState:
        try:
            self.func(state, *bound.args[1:], **bound.kwargs)
        except ProgramError:
            raise
        except Exception as error:  # the program's own code failed: say so, with the steps before it
            raise ProgramError(f"{state.label}: the program body", error) from error
        state.sync()
        return state

    def run(self, *args: Any, backend: Optional[Backend] = None, max_new_tokens: int = 128,
            temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0,
            frequency_penalty: float = 0.0, presence_penalty: float = 0.0, stop: Optional[Sequence[str]] = None,
            seed: Optional[int] = None, timeout_s: float = 600.0, **kwargs: Any) -> ProgramState:
        """Run the program once; returns its finished state (a failed step raises ProgramError)."""
        bound = self._bind(args, kwargs)
        sampling = _sampling(max_new_tokens, temperature, top_p, top_k, min_p, frequency_penalty,
                             presence_penalty, stop, seed)
        return self._execute(self._state(backend, sampling, timeout_s, self.name), bound)

    def run_batch(self, batch_kwargs: Sequence[dict[str, Any]], *, backend: Optional[Backend] = None,
                  num_threads: Any = "auto", progress_bar: bool = False, max_new_tokens: int = 128,
                  temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0,
                  frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                  stop: Optional[Sequence[str]] = None, seed: Optional[int] = None,
                  timeout_s: float = 3600.0) -> list[ProgramState]:
        """Run the program on every argument dict concurrently; the states, in order (see the module doc)."""
        if isinstance(batch_kwargs, dict) or not all(isinstance(k, dict) for k in batch_kwargs):
            raise TypeError("run_batch takes a list of argument dicts, one per program run")
        bound = [self._bind((), dict(k)) for k in batch_kwargs]
        sampling = _sampling(max_new_tokens, temperature, top_p, top_k, min_p, frequency_penalty,
                             presence_penalty, stop, seed)
        backend = backend or get_default_backend()
        states = [self._state(backend, sampling, timeout_s, f"{self.name}[{i}]") for i in range(len(bound))]
        threads = _thread_count(num_threads, len(bound))
        progress = _Progress(len(bound), enabled=progress_bar, label=self.name)

        def one(i: int) -> None:
            try:
                self._execute(states[i], bound[i])
            except ProgramError:
                pass  # kept on the state: error() returns it, reading it raises it
            finally:
                progress.step()

        try:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"baton-{self.name}") as pool:
                list(pool.map(one, range(len(bound))))
        finally:
            progress.close()
        return states


def function(func: Optional[Callable[..., Any]] = None) -> Any:
    """Make `def program(s, **args)` a `Program` (`@baton.function` or `@baton.function()`)."""
    if func is None:
        return function
    if not callable(func):
        raise TypeError("@baton.function decorates a function")
    return Program(func)


def _sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, min_p: float,
              frequency_penalty: float, presence_penalty: float, stop: Optional[Sequence[str]],
              seed: Optional[int]) -> Sampling:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    SamplingArgs(max_tokens=max_new_tokens, stop=stops, temperature=temperature, top_p=top_p, top_k=top_k,
                 min_p=min_p)  # validates
    return Sampling(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, stop=stops, seed=seed)


def _thread_count(num_threads: Any, batch: int) -> int:
    if num_threads == "auto":
        return max(1, min(batch, MAX_AUTO_THREADS))
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int or 'auto', not {num_threads!r}")
    return num_threads


class _Progress:
    """A progress bar on stderr (tqdm when installed, else a counter line)."""

    def __init__(self, total: int, enabled: bool, label: str) -> None:
        self._lock = threading.Lock()
        self._done, self._total, self._label = 0, total, label
        self._bar = None
        self._enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=label, unit="program")
            except ImportError:
                self._bar = None

    def step(self) -> None:
        if not self._enabled:
            return
        with self._lock:
            self._done += 1
            if self._bar is not None:
                self._bar.update(1)
            else:
                sys.stderr.write(f"\r{self._label}: {self._done}/{self._total}")
                sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled:
            sys.stderr.write("\n")
