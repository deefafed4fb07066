"""A server's health follows its engine: NOT_SERVING while admitted work makes no progress.

Health is otherwise set once, at load; a server whose engine thread is stuck (a deadlock,
a hung device call) would keep answering health checks and keep receiving calls. The
interceptor reports every admitted call's start, each response message and its end;
while calls are admitted and none of them has progressed for `stall_s`, the watchdog
says NOT_SERVING (Envoy's health checks then move traffic away), and SERVING again at
the next progress.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, stall_s: float, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        self.stall_s = stall_s
        self._set_serving = set_serving
        self._in_flight = 0
        self._last_progress = time.monotonic()
        self.stalled = False
        self._task: asyncio.Task[None] | None = None

    def begin(self) -> None:
        if self._in_flight == 0:  # idle time before this call is not a stall
            self._last_progress = time.monotonic()
        self._in_flight += 1

    def progress(self) -> None:
        self._last_progress = time.monotonic()
        if self.stalled:
            self._wake()

    def end(self) -> None:
        self._in_flight -= 1
        self.progress()

    def start(self) -> None:
        """Watches from now on (after the model loaded: loading is not a stall)."""
        if self.stall_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _wake(self) -> None:
        self.stalled = False
        log.warning("engine progresses again: SERVING")
        asyncio.get_running_loop().create_task(self._set_serving(True))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.stall_s / 4))
            idle = time.monotonic() - self._last_progress
            if not self.stalled and self._in_flight > 0 and idle >= self.stall_s:
                self.stalled = True
                log.warning("%d admitted call(s) made no progress for %.1fs: NOT_SERVING",
                            self._in_flight, idle)
                await self._set_serving(False)
