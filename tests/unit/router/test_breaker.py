"""CircuitBreaker: opens after consecutive failures, lets one trial through after the
cooldown, closes on success and reopens on a failed trial."""
from baton.router.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_opens_after_threshold_and_recovers_through_one_trial():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=5, clock=clock)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow() and not breaker.available()
    clock.now = 5.0
    assert breaker.state is BreakerState.HALF_OPEN and breaker.available()
    assert breaker.allow()            # the trial
    assert not breaker.allow()        # only one at a time
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.failures == 0


def test_failed_trial_reopens_for_a_new_cooldown():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=2, clock=clock)
    breaker.record_failure()
    clock.now = 2.5
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now = 4.0
    assert breaker.state is BreakerState.OPEN
    clock.now = 4.5
    assert breaker.state is BreakerState.HALF_OPEN


def test_success_resets_the_failure_count():
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=1)
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_a_trial_without_verdict_frees_the_next_trial():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    breaker.record_failure()
    clock.now = 6
    assert breaker.allow() and not breaker.available()  # the trial is out
    breaker.release_trial()  # its client went away: no success, no failure
    assert breaker.state is BreakerState.HALF_OPEN and breaker.available() and breaker.allow()
