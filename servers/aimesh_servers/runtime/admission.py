"""Admission in slots, with a bounded FIFO queue that respects each caller's deadline.

A server has `slots`: how many calls its engine runs at once (a text batch's sequences,
images, audio streams). A call that finds every slot taken waits in a FIFO queue of at
most `max_queue` calls, for at most the smaller of its own deadline and `queue_timeout_s`.
It is refused at once with ServerBusy (RESOURCE_EXHAUSTED + RetryInfo) when the queue is
full or when the expected wait already exceeds that budget; a caller still waiting when
the budget runs out is refused then. A refusal sends no byte of an answer, so Envoy can
still move the call to the next pool.

The expected wait comes from the measured drain rate: an EWMA of how long a call holds
its slot, so slots / hold time is the rate at which slots come free. Everything runs on
the server's event loop: no locks.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass

from .errors import ServerBusy

# Weight of the newest hold time in the EWMA: about the last 10 calls count.
EWMA_WEIGHT = 0.2
# RetryInfo delays are spread by +-25% so that refused callers do not return together.
JITTER = 0.25
MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 30.0


@dataclass(frozen=True)
class Ticket:
    """A held slot: what the caller waited, and how many calls were queued when it came."""

    admitted_at: float
    wait_s: float
    queue_depth: int


class Admission:
    def __init__(self, slots: int, max_queue: int, queue_timeout_s: float,
                 default_retry_after_s: float = 0.5) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.slots = slots
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.default_retry_after_s = default_retry_after_s
        self.in_flight = 0  # slots held
        self.refused = 0  # calls answered ServerBusy over the server's life
        self.hold_s: float | None = None  # EWMA of slot hold times; None until one was released
        self._waiters: deque[asyncio.Future[bool]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def expected_wait_s(self, position: int) -> float | None:
        """Seconds until the caller at queue `position` (1 = next) gets a slot, if measured."""
        if self.hold_s is None:
            return None
        return position * self.hold_s / self.slots

    async def acquire(self, time_remaining_s: float | None) -> Ticket:
        """A slot, at once or after queueing; ServerBusy when none can come in time.
        `time_remaining_s` is the caller's deadline (None: it set none)."""
        arrived = time.monotonic()
        if self.in_flight < self.slots and not self._waiters:
            self.in_flight += 1
            return Ticket(arrived, 0.0, 0)
        position = len(self._waiters) + 1
        budget = self.queue_timeout_s if time_remaining_s is None else min(
            self.queue_timeout_s, time_remaining_s)
        expected = self.expected_wait_s(position)
        if len(self._waiters) >= self.max_queue:
            raise self._busy(f"all {self.slots} slots are busy and the queue is full "
                             f"({self.max_queue} calls wait)", position)
        if budget <= 0 or (expected is not None and expected > budget):
            shown = "unknown" if expected is None else f"{expected:.2f}s"
            raise self._busy(f"all {self.slots} slots are busy; the expected wait ({shown}) "
                             f"does not fit this call's {budget:.2f}s queue budget", position)
        granted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        timer = asyncio.get_running_loop().call_later(budget, self._expire, granted)
        try:
            got_slot = await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled() and granted.result():
                self.release(None)  # handed a slot just as the caller left: pass it on
            else:
                self._leave(granted)
            raise
        finally:
            timer.cancel()
        if not got_slot:
            raise self._busy(f"no slot came free within this call's {budget:.2f}s queue budget",
                             position)
        now = time.monotonic()
        return Ticket(now, now - arrived, position)

    def release(self, ticket: Ticket | None) -> None:
        """Frees a slot (measuring how long `ticket` held it), or hands it to the next waiter."""
        if ticket is not None:
            held = time.monotonic() - ticket.admitted_at
            self.hold_s = held if self.hold_s is None else (
                self.hold_s + EWMA_WEIGHT * (held - self.hold_s))
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)  # the slot changes hands; in_flight stays
                return
        self.in_flight -= 1

    def _expire(self, granted: asyncio.Future[bool]) -> None:
        if not granted.done():
            self._leave(granted)
            granted.set_result(False)

    def _leave(self, granted: asyncio.Future[bool]) -> None:
        try:
            self._waiters.remove(granted)
        except ValueError:  # already handed on or expired
            pass

    def _busy(self, message: str, position: int) -> ServerBusy:
        self.refused += 1
        expected = self.expected_wait_s(position)
        delay = self.default_retry_after_s if expected is None else expected
        delay *= random.uniform(1 - JITTER, 1 + JITTER)
        delay = min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, delay))
        return ServerBusy(
            f"{message}; retry in {delay:.2f}s",
            metadata={"slots": str(self.slots), "queued": str(len(self._waiters)),
                      "max_queue": str(self.max_queue)},
            retry_after_s=round(delay, 3),
        )
