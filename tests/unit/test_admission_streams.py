"""The engine-thread hand-off (runtime.streams): bounded, on the server's own executor."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from aimesh_servers.runtime.streams import CALL_EXECUTOR, iterate_in_thread


async def test_the_engine_thread_waits_for_a_slow_consumer():
    produced = 0

    def produce(cancel: threading.Event):
        nonlocal produced
        for i in range(50):
            produced += 1
            yield i

    seen = []
    ahead = []
    async for item in iterate_in_thread(produce, handoff_items=4):
        seen.append(item)
        ahead.append(produced - len(seen))
        await asyncio.sleep(0.005)
    assert seen == list(range(50))
    # At most 4 handed over and not yet taken, plus the one the engine holds, waiting.
    assert max(ahead) <= 5


async def test_a_consumer_that_leaves_unblocks_and_stops_the_engine_thread():
    stopped = threading.Event()

    def produce(cancel: threading.Event):
        try:
            i = 0
            while True:  # endless: only the cancel ends it
                yield i
                i += 1
        finally:
            stopped.set()

    stream = iterate_in_thread(produce, handoff_items=2)
    assert await anext(stream) == 0
    await asyncio.sleep(0.1)  # the engine thread fills the hand-off and blocks
    await stream.aclose()  # returns once the engine thread has returned
    assert stopped.is_set()


async def test_the_work_runs_on_the_calls_executor():
    with ThreadPoolExecutor(1, thread_name_prefix="server-engine") as executor:
        CALL_EXECUTOR.set(executor)
        try:  # the generator is made in the worker thread: it names that thread
            names = [n async for n in iterate_in_thread(lambda cancel: iter([threading.current_thread().name]))]
        finally:
            CALL_EXECUTOR.set(None)
    assert names and names[0].startswith("server-engine")
