"""`StepStats`: what a worker's engine thread did since its last stats line, logged every few seconds.

The serving counterpart of vLLM's periodic "Avg prompt throughput ... Running: N reqs" line: steps per
second, the mean and longest step, the share of wall time the thread spent stepping or running
commands, the tokens scheduled per step (prefill chunks and decode tokens apart, from the engine's
`last_schedule`), and the batch and queue at the end of the window. It is how a lease tells a slow
engine from a slow serving path around it. Counting is a few additions per step on the engine thread;
the line itself is written from that thread too, once per `interval_s`. The same counts feed
the worker's Prometheus metrics when given (`baton_worker_engine_step_seconds`,
`baton_worker_engine_scheduled_tokens{kind}`), whatever the interval.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger(__name__)


@dataclass
class StepWindow:
    """The counters of one window (reset after each line)."""

    started: float
    steps: int = 0
    step_s: float = 0.0
    longest_step_s: float = 0.0
    command_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    mixed_steps: int = 0
    """Steps that held a prefill chunk and decode tokens at once."""
    deltas: int = 0


class StepStats:
    """Counts steps and logs a line every `interval_s` (0: no line); observes the metrics given."""

    def __init__(self, interval_s: float, clock=time.monotonic, step_seconds: Any = None,
                 scheduled_tokens: Optional[tuple[Any, Any]] = None) -> None:
        """`step_seconds`: a histogram (anything with `observe`) of step wall times; `scheduled_tokens`:
        (prefill, decode) counters (anything with `inc`)."""
        self.interval_s = interval_s
        self._clock = clock
        self._step_seconds = step_seconds
        self._scheduled_tokens = scheduled_tokens
        self.window = StepWindow(started=clock())

    @property
    def enabled(self) -> bool:
        """True when lines are logged."""
        return self.interval_s > 0

    @property
    def recording(self) -> bool:
        """True when steps need counting: lines are logged or metrics observed."""
        return self.interval_s > 0 or self._step_seconds is not None or self._scheduled_tokens is not None

    def record_step(self, seconds: float, schedule: Any, deltas: int) -> None:
        """One engine step: its wall time, the engine's `last_schedule` ((id, start, tokens) per item) and
        how many deltas it returned."""
        w = self.window
        w.steps += 1
        w.step_s += seconds
        w.longest_step_s = max(w.longest_step_s, seconds)
        w.deltas += deltas
        prefill = decode = 0
        for _, _, tokens in schedule or ():
            if tokens > 1:
                prefill += tokens
            else:
                decode += tokens
        w.prefill_tokens += prefill
        w.decode_tokens += decode
        if prefill and decode:
            w.mixed_steps += 1
        if self._step_seconds is not None:
            self._step_seconds.observe(seconds)
        if self._scheduled_tokens is not None:
            if prefill:
                self._scheduled_tokens[0].inc(prefill)
            if decode:
                self._scheduled_tokens[1].inc(decode)

    def record_command(self, seconds: float) -> None:
        """One command run between steps (adding, aborting, reading stats...)."""
        self.window.command_s += seconds

    def maybe_log(self, engine: Any) -> Optional[str]:
        """Log and reset when the window is over; returns the line (None when not yet or disabled)."""
        if not self.enabled:
            return None
        now = self._clock()
        elapsed = now - self.window.started
        if elapsed < self.interval_s:
            return None
        line = self.format(elapsed, engine)
        self.window = StepWindow(started=now)
        log.info("%s", line)
        return line

    def format(self, elapsed: float, engine: Any) -> str:
        """The line for the current window over `elapsed` seconds."""
        w = self.window
        steps = max(w.steps, 1)
        busy = (w.step_s + w.command_s) / elapsed if elapsed > 0 else 0.0
        stats = engine.stats()
        return (f"engine: {w.steps / elapsed:.1f} steps/s, step mean {1e3 * w.step_s / steps:.2f} ms "
                f"max {1e3 * w.longest_step_s:.1f} ms, busy {100 * busy:.0f}% (commands {1e3 * w.command_s:.0f} ms), "
                f"per step {w.decode_tokens / steps:.1f} decode + {w.prefill_tokens / steps:.1f} prefill tokens "
                f"({w.mixed_steps} mixed steps), prompt {w.prefill_tokens / elapsed:.0f} tok/s, "
                f"generation {w.deltas / elapsed:.0f} deltas/s; running {stats.running_requests}, "
                f"waiting {stats.waiting_requests}, reserved {stats.reserved_requests}, "
                f"KV {100 * stats.kv_usage:.1f}%")
