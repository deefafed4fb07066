"""Dynamic batching: many callers' items, one forward pass.

A `DynamicBatcher` owns one worker thread. Callers `submit` items (from any thread) or
`await run(item)` (from an event loop); the worker takes the oldest item, keeps
collecting until `max_items` (counted in item sizes, e.g. texts) or until the oldest
has waited `max_wait_ms`, then calls `run_batch` once with all of them. `run_batch`
answers each item with a result or an exception of its own, so one bad item fails only
its caller. An item whose caller went away before its batch started is dropped; one
that is already running gets its `cancel` event set (the engine may stop its row early)
and its caller keeps its slot until the model is done with it.

The queue is bounded by `capacity` (callers that may wait or run at once); the server's
admission reads `engine.capacity` so that enough calls get in to form full batches.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ServerBusy

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatchSettings(BaseSettings):
    """AIMESH_BATCH_MAX_ITEMS, _MAX_WAIT_MS, _CAPACITY, _TORCH_THREADS."""

    model_config = SettingsConfigDict(env_prefix="AIMESH_BATCH_", extra="ignore")

    max_items: int = Field(32, ge=1, description="items (texts, images) in one forward pass at most")
    # Measured (bench_embedding --sweep, 2 cores): at 16 callers the worker is never idle, so
    # batches fill while the previous one runs and waiting gains nothing; at 1 caller any wait
    # is pure latency (p50 9.9 ms with 0 ms, 12.5-14.4 ms with 2 ms).
    max_wait_ms: float = Field(
        0.0, ge=0, description="how long the oldest waiting item may wait for others to join its batch")
    capacity: int | None = Field(
        None, ge=1, description="callers admitted at once (waiting or running); default 2 x max_items, "
                                "so that a batch fills while the previous one runs")
    # Measured on 2 shared cores (bench_embedding --sweep): with 2 threads, each of the
    # forward pass's parallel regions waits whenever the event loop or another process
    # preempts one of them, and 16 callers got 4-34 calls/s; with 1, 146-159.
    torch_threads: int = Field(
        1, ge=1, description="intra-op threads of the batch worker's forward passes (one pass runs at a time; "
                             "the batch, not threads, makes it efficient, and the event loop keeps a core)")

    @property
    def admitted(self) -> int:
        return self.capacity or 2 * self.max_items


@dataclass
class Work(Generic[Item, Result]):
    """One caller's item as `run_batch` sees it."""

    item: Item
    size: int
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future[Result] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0  # items that ran, summed over batches (sizes, not calls)
    calls: int = 0  # submissions that ran
    dropped: int = 0  # submissions cancelled before their batch started
    largest: int = 0  # the most items one batch held


class DynamicBatcher(Generic[Item, Result]):
    def __init__(
        self,
        run_batch: Callable[[Sequence[Work[Item, Result]]], Sequence[Result | BaseException]],
        settings: BatchSettings,
        name: str = "batcher",
    ) -> None:
        self.run_batch = run_batch
        self.max_items = settings.max_items
        self.max_wait_s = settings.max_wait_ms / 1000
        self.capacity = settings.admitted
        self.stats = BatchStats()
        self._pending: collections.deque[Work[Item, Result]] = collections.deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        """Submissions queued for a batch that has not started (the queue depth)."""
        with self._wakeup:
            return len(self._pending)

    def submit(self, item: Item, size: int = 1) -> Work[Item, Result]:
        """Queue an item; its `future` answers. ServerBusy when `capacity` callers wait already."""
        work: Work[Item, Result] = Work(item, max(1, size))
        with self._wakeup:
            if self._closed:
                raise RuntimeError("batcher is closed")
            if len(self._pending) >= self.capacity:
                raise ServerBusy(
                    f"{len(self._pending)} calls already wait for a batch; retry later",
                    metadata={"capacity": str(self.capacity)}, retry_after_s=0.1)
            self._pending.append(work)
            self._wakeup.notify()
        return work

    async def run(self, item: Item, size: int = 1) -> Result:
        """Submit and await the answer. Cancelling the awaiting task drops the item if its
        batch has not started; otherwise it returns once the batch is done with it."""
        work = self.submit(item, size)
        try:
            return await asyncio.wrap_future(work.future)
        except asyncio.CancelledError:
            work.cancel.set()
            if work.future.cancel():  # not started: the worker drops it now
                with self._wakeup:
                    self._wakeup.notify()
            else:  # running: hold the caller's slot until the model is done with it
                with contextlib.suppress(BaseException):
                    await asyncio.shield(asyncio.wrap_future(work.future))
            raise

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking items; items already queued still run."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._worker.join(timeout)

    def _next_batch(self) -> list[Work[Item, Result]] | None:
        """The next items to run, once full or the oldest has waited long enough; None once closed."""
        with self._wakeup:
            while True:
                if any(w.future.cancelled() for w in self._pending):
                    kept = [w for w in self._pending if not w.future.cancelled()]
                    self.stats.dropped += len(self._pending) - len(kept)
                    self._pending = collections.deque(kept)
                if self._pending:
                    waited_until = self._pending[0].queued_at + self.max_wait_s
                    queued = sum(w.size for w in self._pending)
                    remaining = waited_until - time.monotonic()
                    if queued >= self.max_items or remaining <= 0 or self._closed:
                        break
                    self._wakeup.wait(remaining)
                elif self._closed:
                    return None
                else:
                    self._wakeup.wait()
            batch: list[Work[Item, Result]] = []
            size = 0
            while self._pending and (not batch or size + self._pending[0].size <= self.max_items):
                work = self._pending.popleft()
                # False: cancelled while queued. True: it can no longer be cancelled.
                if work.future.set_running_or_notify_cancel():
                    batch.append(work)
                    size += work.size
                else:
                    self.stats.dropped += 1
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            try:
                results = self.run_batch(batch)
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch answered {len(results)} of {len(batch)} items")
            except BaseException as exc:  # noqa: BLE001 - the whole batch failed: each caller hears why
                results = [exc] * len(batch)
            size = sum(w.size for w in batch)
            self.stats.batches += 1  # counted before answering: a caller that got its answer sees its batch
            self.stats.calls += len(batch)
            self.stats.items += size
            self.stats.largest = max(self.stats.largest, size)
            for work, result in zip(batch, results):
                if isinstance(result, BaseException):
                    work.future.set_exception(result)
                else:
                    work.future.set_result(result)
