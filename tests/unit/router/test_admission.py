"""RoomQueue: FIFO waiting for room, bounded, deadline-bound, woken by capacity changes."""
from __future__ import annotations

import asyncio
import time

import pytest

from baton.protos.errors import BatonError, ErrorCode
from baton.router.admission import RoomQueue


def test_full_queue_refuses_with_retry_after() -> None:
    async def scenario():
        queue = RoomQueue(limit=2, retry_after_s=3.0)
        with queue.queued(), queue.queued():
            assert queue.waiting == 2
            with pytest.raises(BatonError) as refused:
                with queue.queued():
                    pass
        return queue, refused.value
    queue, error = asyncio.run(scenario())
    assert error.code == ErrorCode.OVERLOADED and error.retry_after_s == 3.0
    assert queue.waiting == 0 and not queue.has_waiters


def test_waiters_wake_in_arrival_order_and_take_the_slots() -> None:
    async def scenario():
        queue = RoomQueue(limit=8, poll_s=10.0)
        slots = [1]
        order: list[int] = []

        async def waiter(i: int) -> None:
            with queue.queued():
                while True:
                    await queue.wait_for_change(time.monotonic() + 5)
                    if slots[0] > 0:
                        slots[0] -= 1
                        order.append(i)
                        return

        tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        queue.wake()  # one slot: the first waiter takes it, the others wait again
        await asyncio.sleep(0.01)
        assert order == [0] and queue.waiting == 2
        slots[0] = 2
        queue.wake()
        await asyncio.gather(*tasks)
        return order, queue.waiting
    assert asyncio.run(scenario()) == ([0, 1, 2], 0)


def test_wait_ends_at_poll_or_deadline() -> None:
    async def scenario():
        queue = RoomQueue(limit=1, poll_s=0.05)
        started = time.monotonic()
        await queue.wait_for_change(time.monotonic() + 5)  # nothing woke it: back after poll_s
        polled = time.monotonic() - started
        with pytest.raises(BatonError) as late:
            await queue.wait_for_change(time.monotonic() - 0.001)
        return polled, late.value
    polled, error = asyncio.run(scenario())
    assert 0.04 <= polled < 1.0
    assert error.code == ErrorCode.DEADLINE_EXCEEDED
