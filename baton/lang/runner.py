"""`StepRunner`: one state's steps, run in order in the background (SGLang's stream executor).

`s += expr` only queues a step; a thread of the state's own runs the queue in order, so a
program goes on building (and its forks run in parallel) while calls are in flight. The
thread exists only while there is work: it starts on the first step queued and ends when
the queue is empty, so finished states hold no thread.

After a step fails the runner skips the rest and keeps the `ProgramError` (naming the step);
`wait` raises it. Every wait has a deadline: `wait` gives up at the state's deadline with a
`ProgramError` saying which step was still running.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Optional

from baton.lang.errors import ProgramError


class StepRunner:
    """Runs queued steps in order on a background thread; keeps the first failure."""

    def __init__(self, label: str) -> None:
        self.label = label
        """Names the program (and fork) in error messages."""
        self._lock = threading.Lock()
        self._queue: deque[tuple[str, Callable[[], None]]] = deque()
        self._idle = threading.Event()
        self._idle.set()
        self._running = False
        self._current: Optional[str] = None
        self._count = 0
        self.error: Optional[ProgramError] = None

    def submit(self, description: str, step: Callable[[], None]) -> None:
        """Queue a step (`description` names it in errors, e.g. "gen('answer')")."""
        with self._lock:
            self._count += 1
            self._queue.append((f"{self.label}: step {self._count} {description}", step))
            self._idle.clear()
            if not self._running:
                self._running = True
                threading.Thread(target=self._drain, name=f"baton-lang {self.label}", daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running, self._current = False, None
                    self._idle.set()
                    return
                where, step = self._queue.popleft()
                self._current = where
            if self.error is not None:
                continue  # a step failed: the ones after it do not run
            try:
                step()
            except ProgramError as error:
                self.error = error
            except Exception as error:  # the step's failure, named
                self.error = ProgramError(where, error)

    def wait(self, deadline: float) -> None:
        """Block until every queued step ran (or the deadline, a monotonic time, passed);
        raises the failed step's ProgramError."""
        if not self._idle.wait(max(0.0, deadline - time.monotonic())):
            current = self._current or f"{self.label}: a step"
            raise ProgramError(current, TimeoutError("the program's deadline passed while it was running"))
        if self.error is not None:
            raise self.error

    @property
    def steps(self) -> int:
        """Steps queued so far."""
        return self._count
