"""A per-worker circuit breaker: closed -> open after consecutive failures -> half-open
after a cooldown (one trial request) -> closed on success, open again on failure."""
from __future__ import annotations

import enum
import time
from typing import Callable


class BreakerState(enum.Enum):
    """Where a breaker is; the value is what metrics and /workers show."""

    CLOSED = "closed"
    """Work flows."""
    OPEN = "open"
    """Too many consecutive failures: no work until the cooldown ends."""
    HALF_OPEN = "half_open"
    """Cooldown over: one trial request may go through."""


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
    def state(self) -> BreakerState:
        """Closed, open, or half-open once the cooldown has passed."""
        if self.opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self.opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self) -> bool:
        """True when a request may go to the worker now (claims the trial when half-open)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def available(self) -> bool:
        """Like allow() but without claiming the half-open trial (for listing candidates)."""
        state = self.state
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self.trial_in_flight)

    def release_trial(self) -> None:
        """The half-open trial ended with no verdict (its client went away, its deadline passed):
        the next request may be the trial."""
        self.trial_in_flight = False

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
