"""Run a blocking engine generator off the event loop, as an async iterator.

The engine gets a `threading.Event`; it is set when the consumer stops (the RPC was
cancelled, the client went away, or it simply finished), so the engine can stop its
real work. The iterator only ends once the worker thread has returned, so a
concurrency slot is never released while the model is still busy.

No hidden queues: the worker runs on the server's own executor (sized from its slots,
set per call in `CALL_EXECUTOR` by the interceptor), and at most `HANDOFF_ITEMS` items
wait between the engine thread and the consumer; beyond that the engine thread blocks
until the consumer catches up (a slow client slows its own generation, not the server's
memory).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")
_END = object()
HANDOFF_ITEMS = 64
# How often a blocked engine thread looks whether the consumer left.
_CANCEL_POLL_S = 0.05

# The executor of the server running the current call (None: the loop's default).
CALL_EXECUTOR: contextvars.ContextVar[Executor | None] = contextvars.ContextVar(
    "aimesh_call_executor", default=None)


async def iterate_in_thread(produce: Callable[[threading.Event], Iterator[T]],
                            handoff_items: int = HANDOFF_ITEMS) -> AsyncIterator[T]:
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()
    room = threading.Semaphore(handoff_items)  # free places in `items`
    cancel = threading.Event()

    def hand_over(item: object, error: BaseException | None = None) -> None:
        loop.call_soon_threadsafe(items.put_nowait, (item, error))

    def run() -> None:
        try:
            for item in produce(cancel):
                while not room.acquire(timeout=_CANCEL_POLL_S):
                    if cancel.is_set():
                        return
                hand_over(item)
                if cancel.is_set():
                    break
        except BaseException as exc:  # handed to the consumer
            hand_over(_END, exc)
            return
        hand_over(_END)

    worker = loop.run_in_executor(CALL_EXECUTOR.get(), run)
    try:
        while True:
            item, error = await items.get()
            if error is not None:
                raise error
            if item is _END:
                return
            room.release()
            yield item  # type: ignore[misc]
    finally:
        cancel.set()
        await asyncio.shield(worker)
