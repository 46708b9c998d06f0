"""Backpressure in the router: requests wait here until a worker has room.

A busy worker is not a dead one. When every healthy worker of a role is full (its
router-side in-flight count reached the capacity it reports, or it just answered
OVERLOADED), a request joins this FIFO and waits, within its own deadline, for a slot to
free: a request ending on any worker, or a fresh load report, wakes the waiters, which
re-check in arrival order. New requests queue behind waiting ones rather than overtaking
them. Only when the queue already holds `limit` requests does a new one get OVERLOADED (the
gateway's 429 with Retry-After).

Invariants: `waiting` counts the requests inside `wait_for_room`; a request is counted
at most once however many times it re-waits; a waiter never sleeps past its deadline or
`poll_s` (capacity can also appear without a wake-up: a breaker's cooldown ending).
"""
from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from typing import Iterator

from baton.protos.errors import BatonError, ErrorCode


class RoomQueue:
    """The router's queue of requests waiting for a worker with room."""

    def __init__(self, limit: int, poll_s: float = 0.25, retry_after_s: float = 1.0) -> None:
        self.limit = limit
        self.poll_s = poll_s
        self.retry_after_s = retry_after_s
        self.waiting = 0
        """Requests now waiting for room."""
        self._changed = asyncio.Event()

    def wake(self) -> None:
        """Capacity may have freed: every waiter re-checks."""
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def has_waiters(self) -> bool:
        return self.waiting > 0

    @contextmanager
    def queued(self) -> Iterator[None]:
        """Count the caller as waiting (refused with OVERLOADED when the queue is full)."""
        if self.waiting >= self.limit:
            raise BatonError(ErrorCode.OVERLOADED, f"{self.waiting} requests already wait for a worker with room",
                             retry_after_s=self.retry_after_s)
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1

    async def wait_for_change(self, deadline: float) -> None:
        """Sleep until capacity may have changed, `poll_s` passed, or the deadline came
        (then DEADLINE_EXCEEDED)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise BatonError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed while it waited for a worker")
        try:
            await asyncio.wait_for(self._changed.wait(), min(left, self.poll_s))
        except asyncio.TimeoutError:
            pass
