"""A per-worker circuit breaker: closed -> open after consecutive failures -> half-open
after a cooldown (one trial request) -> closed on success, open again on failure."""
from __future__ import annotations

import time
from typing import Callable


class CircuitBreaker:
    """Counts consecutive failures of one worker and says whether to send it work."""

    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.trial_in_flight = False

    @property
    def state(self) -> str:
        """closed, open or half_open."""
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self.cooldown_s:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """True when a request may go to the worker now (claims the trial when half-open)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def available(self) -> bool:
        """Like allow() but without claiming the half-open trial (for listing candidates)."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self.trial_in_flight)

    def record_success(self) -> None:
        """The worker served a request: close the breaker."""
        self.failures = 0
        self.opened_at = None
        self.trial_in_flight = False

    def record_failure(self) -> None:
        """The worker failed a request: count it, open the breaker at the threshold."""
        self.failures += 1
        self.trial_in_flight = False
        if self.failures >= self.failure_threshold or self.opened_at is not None:
            self.opened_at = self.clock()
