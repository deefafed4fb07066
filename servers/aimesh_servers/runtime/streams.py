"""Run a blocking engine generator off the event loop, as an async iterator.

The engine gets a `threading.Event`; it is set when the consumer stops (the RPC was
cancelled, the client went away, or it simply finished), so the engine can stop its
real work. The iterator only ends once the worker thread has returned, so a
concurrency slot is never released while the model is still busy.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


async def iterate_in_thread(produce: Callable[[threading.Event], Iterator[T]]) -> AsyncIterator[T]:
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()
    cancel = threading.Event()

    def run() -> None:
        try:
            for item in produce(cancel):
                loop.call_soon_threadsafe(items.put_nowait, (item, None))
                if cancel.is_set():
                    break
        except BaseException as exc:  # handed to the consumer
            loop.call_soon_threadsafe(items.put_nowait, (_END, exc))
            return
        loop.call_soon_threadsafe(items.put_nowait, (_END, None))

    worker = loop.run_in_executor(None, run)
    try:
        while True:
            item, error = await items.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item  # type: ignore[misc]
    finally:
        cancel.set()
        await asyncio.shield(worker)
