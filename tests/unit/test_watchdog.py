"""The watchdog: NOT_SERVING while admitted calls make no progress, SERVING at the next."""

from __future__ import annotations

import asyncio
import time

from aimesh_servers.runtime.watchdog import Watchdog


async def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


def test_stalled_admitted_work_goes_not_serving_and_progress_brings_it_back():
    async def scenario() -> list[bool]:
        said: list[bool] = []

        async def set_serving(serving: bool) -> None:
            said.append(serving)

        dog = Watchdog(0.2, set_serving)
        dog.start()
        try:
            await asyncio.sleep(0.5)  # idle: no admitted work, no stall
            assert said == []
            dog.begin()
            await _until(lambda: said == [False])
            assert dog.stalled
            dog.progress()
            await _until(lambda: said == [False, True])
            dog.end()
            await asyncio.sleep(0.5)  # idle again after the call ended
            return said
        finally:
            dog.stop()

    assert asyncio.run(scenario()) == [False, True]


def test_steady_progress_never_stalls_and_zero_turns_it_off():
    async def scenario(stall_s: float) -> list[bool]:
        said: list[bool] = []

        async def set_serving(serving: bool) -> None:
            said.append(serving)

        dog = Watchdog(stall_s, set_serving)
        dog.start()
        dog.begin()
        try:
            for _ in range(20):
                await asyncio.sleep(0.05)
                if stall_s:
                    dog.progress()
            return said
        finally:
            dog.end()
            dog.stop()

    assert asyncio.run(scenario(0.3)) == []
    assert asyncio.run(scenario(0)) == []
