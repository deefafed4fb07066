"""DynamicBatcher with a plain function as the batch: batches form, each caller gets its
own answer or its own error, cancel drops an item whose batch has not started, and the
queue is bounded. Conditions are polled; a gate (threading.Event) holds a batch running."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import pytest
from aimesh_servers.runtime.batching import BatchSettings, DynamicBatcher, Work
from aimesh_servers.runtime.errors import InvalidArgument, ServerBusy

WAIT_S = 30.0


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class Recorder:
    """A batch function: squares ints, fails negatives alone, records every batch it ran;
    blocks while `gate` is clear."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.cancelled_seen: list[bool] = []

    def __call__(self, batch: Sequence[Work[int, int]]) -> list[int | Exception]:
        self.started.set()
        assert self.gate.wait(WAIT_S)
        self.batches.append([w.item for w in batch])
        self.cancelled_seen += [w.cancel.is_set() for w in batch]
        return [InvalidArgument(f"{w.item} is negative", field="x") if w.item < 0 else w.item ** 2
                for w in batch]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def batcher(recorder: Recorder, **settings: float) -> DynamicBatcher[int, int]:
    return DynamicBatcher(recorder, BatchSettings(**settings))


async def test_concurrent_callers_share_batches_and_each_gets_its_own_answer(recorder):
    b = batcher(recorder, max_items=8, max_wait_ms=1000)
    try:
        answers = await asyncio.gather(*(b.run(i) for i in range(16)))
        assert answers == [i * i for i in range(16)]
        assert sorted(x for batch in recorder.batches for x in batch) == list(range(16))
        assert b.stats.calls == 16 and b.stats.items == 16
        assert b.stats.batches < 16 and b.stats.largest > 1, recorder.batches
        assert max(len(batch) for batch in recorder.batches) <= 8
    finally:
        b.close()


async def test_a_bad_item_fails_only_its_caller(recorder):
    b = batcher(recorder, max_items=3, max_wait_ms=60_000)
    try:
        answers = await asyncio.gather(*(b.run(i) for i in (1, -2, 3)), return_exceptions=True)
        assert answers[0] == 1 and answers[2] == 9
        assert isinstance(answers[1], InvalidArgument) and answers[1].field == "x"
        assert [sorted(batch) for batch in recorder.batches] == [[-2, 1, 3]]
    finally:
        b.close()


async def test_a_crashing_batch_answers_every_caller_with_the_error_and_the_worker_lives_on():
    calls = []

    def crash_once(batch: Sequence[Work[int, int]]) -> list[int]:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("model fell over")
        return [w.item for w in batch]

    b = DynamicBatcher(crash_once, BatchSettings(max_items=4, max_wait_ms=50))
    try:
        answers = await asyncio.gather(b.run(1), b.run(2), return_exceptions=True)
        assert all(isinstance(a, RuntimeError) for a in answers), answers
        assert await b.run(5) == 5
    finally:
        b.close()


async def test_sizes_count_toward_max_items_and_an_oversized_item_runs_alone(recorder):
    b = batcher(recorder, max_items=4, max_wait_ms=300)
    try:
        recorder.gate.clear()  # the first batch holds the worker while the others queue
        first = asyncio.ensure_future(b.run(0))
        await asyncio.to_thread(recorder.started.wait, WAIT_S)
        rest = [asyncio.ensure_future(b.run(i, size=s)) for i, s in ((1, 3), (2, 2), (3, 9), (4, 1))]
        await asyncio.to_thread(wait_until, lambda: b.waiting == 4, "4 queued")
        recorder.gate.set()
        assert await asyncio.gather(first, *rest) == [0, 1, 4, 9, 16]
        # In arrival order, never over 4 items unless one item alone is bigger.
        assert recorder.batches == [[0], [1], [2], [3], [4]]
        assert b.stats.items == 1 + 3 + 2 + 9 + 1 and b.stats.largest == 9
    finally:
        b.close()


async def test_a_full_batch_does_not_wait_for_max_wait(recorder):
    b = batcher(recorder, max_items=3, max_wait_ms=60_000)
    try:
        # Three items fill a batch: it runs at once, not after a minute (the test would time out).
        assert await asyncio.wait_for(asyncio.gather(*(b.run(i) for i in range(3))), WAIT_S) == [0, 1, 4]
        assert recorder.batches == [[0, 1, 2]]
    finally:
        b.close()


async def test_cancel_drops_an_item_whose_batch_has_not_started(recorder):
    b = batcher(recorder, max_items=2, max_wait_ms=0)
    try:
        recorder.gate.clear()
        running = asyncio.ensure_future(b.run(1))
        await asyncio.to_thread(recorder.started.wait, WAIT_S)
        doomed = asyncio.ensure_future(b.run(2))
        kept = asyncio.ensure_future(b.run(3))
        await asyncio.to_thread(wait_until, lambda: b.waiting == 2, "2 queued")
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        recorder.gate.set()
        assert await running == 1 and await kept == 9
        assert recorder.batches == [[1], [3]]
        assert b.stats.dropped == 1 and b.stats.calls == 2
    finally:
        b.close()


async def test_cancel_of_a_running_item_signals_it_and_returns_only_once_its_batch_is_done(recorder):
    b = batcher(recorder, max_items=2, max_wait_ms=0)
    try:
        recorder.gate.clear()
        running = asyncio.ensure_future(b.run(7))
        await asyncio.to_thread(recorder.started.wait, WAIT_S)
        running.cancel()
        await asyncio.sleep(0)  # let the cancel reach the task; the batch still holds it
        assert not running.done()
        recorder.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert recorder.batches == [[7]] and recorder.cancelled_seen == [True]
    finally:
        b.close()


def test_submit_beyond_capacity_is_refused_with_retry_advice(recorder):
    b = batcher(recorder, max_items=1, max_wait_ms=0, capacity=2)
    try:
        recorder.gate.clear()
        running = b.submit(0)
        wait_until(recorder.started.is_set, "the first batch to start")
        queued = [b.submit(1), b.submit(2)]
        with pytest.raises(ServerBusy) as caught:
            b.submit(3)
        assert caught.value.retry_after_s is not None and caught.value.metadata["capacity"] == "2"
        recorder.gate.set()
        assert [w.future.result(WAIT_S) for w in (running, *queued)] == [0, 1, 4]
    finally:
        b.close()


def test_threads_can_submit_and_block_on_the_future(recorder):
    b = batcher(recorder, max_items=4, max_wait_ms=20)
    try:
        answers: dict[int, int] = {}

        def call(i: int) -> None:
            answers[i] = b.submit(i).future.result(WAIT_S)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert answers == {i: i * i for i in range(8)}
    finally:
        b.close()


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("AIMESH_BATCH_MAX_ITEMS", "5")
    monkeypatch.setenv("AIMESH_BATCH_MAX_WAIT_MS", "7.5")
    settings = BatchSettings()
    assert (settings.max_items, settings.max_wait_ms, settings.admitted) == (5, 7.5, 10)
    monkeypatch.setenv("AIMESH_BATCH_CAPACITY", "3")
    assert BatchSettings().admitted == 3
