"""Admission without gRPC: slots, the bounded FIFO queue, budgets, cancellation, drain rate."""

from __future__ import annotations

import asyncio
import time

import pytest
from aimesh_servers.runtime.admission import Admission
from aimesh_servers.runtime.errors import ServerBusy
from google.rpc import code_pb2


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.005)


async def test_free_slots_admit_at_once_then_callers_wait_in_fifo_order():
    admission = Admission(slots=2, max_queue=4, queue_timeout_s=30)
    held = [await admission.acquire(None) for _ in range(2)]
    assert admission.in_flight == 2 and all(t.wait_s == 0 and t.queue_depth == 0 for t in held)
    order: list[int] = []

    async def wait(i: int):
        ticket = await admission.acquire(None)
        order.append(i)
        return ticket

    waiters = [asyncio.create_task(wait(i)) for i in range(3)]
    await until(lambda: admission.waiting == 3)
    for ticket in held:
        admission.release(ticket)
    await until(lambda: len(order) == 2)
    assert order == [0, 1] and admission.waiting == 1 and admission.in_flight == 2
    admission.release(await waiters[0])
    third = await waiters[2]
    assert order == [0, 1, 2] and third.queue_depth == 3 and third.wait_s > 0
    admission.release(await waiters[1])
    admission.release(third)
    assert admission.in_flight == 0 and admission.waiting == 0


async def test_a_full_queue_refuses_at_once_with_a_retry_delay():
    admission = Admission(slots=1, max_queue=1, queue_timeout_s=30, default_retry_after_s=0.5)
    held = await admission.acquire(None)
    waiter = asyncio.create_task(admission.acquire(None))
    await until(lambda: admission.waiting == 1)
    with pytest.raises(ServerBusy) as caught:
        await admission.acquire(None)
    error = caught.value
    assert error.code == code_pb2.RESOURCE_EXHAUSTED and error.reason_name == "SERVER_BUSY"
    assert 0.375 <= error.retry_after_s <= 0.625  # nothing measured yet: the default, jittered
    assert error.metadata == {"slots": "1", "queued": "1", "max_queue": "1"}
    assert admission.refused == 1 and admission.waiting == 1
    admission.release(held)
    admission.release(await waiter)
    assert admission.in_flight == 0


async def test_the_retry_delay_and_expected_wait_follow_the_measured_hold_time():
    admission = Admission(slots=2, max_queue=0, queue_timeout_s=30)
    assert admission.expected_wait_s(1) is None
    tickets = [await admission.acquire(None) for _ in range(2)]
    await asyncio.sleep(0.2)  # the calls hold their slots a while: the figure to measure
    for ticket in tickets:
        admission.release(ticket)
    hold = admission.hold_s
    assert hold is not None and hold >= 0.2
    assert admission.expected_wait_s(3) == pytest.approx(3 * hold / 2)
    tickets = [await admission.acquire(None) for _ in range(2)]
    with pytest.raises(ServerBusy) as caught:
        await admission.acquire(None)
    assert 0.75 * hold / 2 <= caught.value.retry_after_s <= 1.25 * hold / 2 + 0.001
    for ticket in tickets:
        admission.release(ticket)


async def test_an_expected_wait_beyond_the_deadline_is_refused_without_queueing():
    admission = Admission(slots=1, max_queue=8, queue_timeout_s=30)
    ticket = await admission.acquire(None)
    await asyncio.sleep(0.3)
    admission.release(ticket)  # measured: a call holds its slot >= 0.3 s
    held = await admission.acquire(None)
    with pytest.raises(ServerBusy) as caught:
        await admission.acquire(time_remaining_s=0.1)
    assert "does not fit" in caught.value.message and admission.waiting == 0
    # The server's own queue limit bounds it the same way.
    short = Admission(slots=1, max_queue=8, queue_timeout_s=0.1)
    first = await short.acquire(None)  # nothing measured yet: a caller queues, then its budget runs out
    with pytest.raises(ServerBusy) as caught:
        await short.acquire(None)
    assert "within this call's 0.10s queue budget" in caught.value.message
    assert short.waiting == 0 and short.in_flight == 1
    short.release(first)
    admission.release(held)


async def test_a_cancelled_waiter_leaves_the_queue_at_once():
    admission = Admission(slots=1, max_queue=1, queue_timeout_s=30)
    held = await admission.acquire(None)
    waiter = asyncio.create_task(admission.acquire(None))
    await until(lambda: admission.waiting == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert admission.waiting == 0
    # Its place is free again: the next caller queues instead of being refused.
    again = asyncio.create_task(admission.acquire(None))
    await until(lambda: admission.waiting == 1)
    admission.release(held)
    admission.release(await again)
    assert admission.in_flight == 0 and admission.refused == 0


async def test_a_slot_handed_to_a_caller_that_just_left_passes_on():
    admission = Admission(slots=1, max_queue=2, queue_timeout_s=30)
    held = await admission.acquire(None)
    leaving = asyncio.create_task(admission.acquire(None))
    staying = asyncio.create_task(admission.acquire(None))
    await until(lambda: admission.waiting == 2)
    admission.release(held)  # the slot goes to `leaving`...
    leaving.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await leaving
    ticket = await staying
    assert admission.in_flight == 1 and admission.waiting == 0
    admission.release(ticket)
    assert admission.in_flight == 0


async def test_many_cancels_leak_no_slot_and_no_queue_entry():
    admission = Admission(slots=2, max_queue=60, queue_timeout_s=30)

    async def call(hold: float) -> None:
        ticket = await admission.acquire(None)
        try:
            await asyncio.sleep(hold)
        finally:
            admission.release(ticket)

    tasks = [asyncio.create_task(call(0.01 * (i % 5))) for i in range(60)]
    await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(r, asyncio.CancelledError) for r in results) >= 1
    assert [r for r in results if r is not None and not isinstance(r, asyncio.CancelledError)] == []
    assert admission.in_flight == 0 and admission.waiting == 0
