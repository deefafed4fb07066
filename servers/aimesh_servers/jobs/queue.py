"""How items reach workers: an asyncio queue inside the control process (default), or a
Redis stream with a consumer group shared by `aimesh worker` processes (`--redis`).

A delivery is only a pointer (job, item, model); the database decides whether it still
needs running (JobStore.claim), so a duplicate delivery is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

STREAM = "aimesh:jobs:items"
GROUP = "aimesh-workers"


@dataclass(frozen=True)
class Delivery:
    job_id: str
    index: int
    model: str
    message_id: str = ""  # Redis stream id


class ItemQueue(Protocol):
    async def put(self, items: Iterable[Delivery]) -> None: ...
    async def get(self) -> Delivery: ...
    async def ack(self, delivery: Delivery) -> None: ...
    async def retry_later(self, delivery: Delivery, delay_s: float) -> None: ...
    async def close(self) -> None: ...


class MemoryQueue:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._timers: set[asyncio.TimerHandle] = set()

    async def put(self, items: Iterable[Delivery]) -> None:
        for item in items:
            self._queue.put_nowait(item)

    async def get(self) -> Delivery:
        return await self._queue.get()

    async def ack(self, delivery: Delivery) -> None:
        """Nothing to do: a memory queue forgets what it handed out."""

    async def retry_later(self, delivery: Delivery, delay_s: float) -> None:
        def again() -> None:
            self._timers.discard(timer)
            self._queue.put_nowait(delivery)

        timer = asyncio.get_running_loop().call_later(delay_s, again)
        self._timers.add(timer)

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()


class RedisQueue:
    """XADD per item; workers XREADGROUP as consumers of one group and XACK when the item
    is final. A message left unacknowledged for a lease (its consumer died, or the item
    was busy elsewhere) is taken over with XAUTOCLAIM by the next worker that looks."""

    def __init__(self, url: str, consumer: str, lease_s: float) -> None:
        import redis.asyncio as redis

        self.redis = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)
        self.consumer = consumer
        self.idle_ms = int(lease_s * 1000)
        self._ready = False
        self._buffer: list[Delivery] = []
        self._next_reclaim = 0.0

    async def _group(self) -> None:
        if not self._ready:
            with contextlib.suppress(Exception):  # BUSYGROUP: it exists
                await self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
            self._ready = True

    async def put(self, items: Iterable[Delivery]) -> None:
        await self._group()
        async with self.redis.pipeline(transaction=False) as pipe:
            for item in items:
                pipe.xadd(STREAM, {"job": item.job_id, "index": str(item.index), "model": item.model})
            await pipe.execute()

    @staticmethod
    def _delivery(message_id: bytes, fields: dict[bytes, bytes]) -> Delivery:
        return Delivery(job_id=fields[b"job"].decode(), index=int(fields[b"index"]),
                        model=fields[b"model"].decode(), message_id=message_id.decode())

    async def get(self) -> Delivery:
        await self._group()
        loop = asyncio.get_running_loop()
        while not self._buffer:
            if loop.time() >= self._next_reclaim:
                self._next_reclaim = loop.time() + self.idle_ms / 2000
                _, claimed, *_ = await self.redis.xautoclaim(STREAM, GROUP, self.consumer,
                                                             min_idle_time=self.idle_ms, count=16)
                self._buffer += [self._delivery(mid, fields) for mid, fields in claimed if fields]
                if self._buffer:
                    break
            read = await self.redis.xreadgroup(GROUP, self.consumer, {STREAM: ">"}, count=1, block=1000)
            for _, messages in read or ():
                self._buffer += [self._delivery(mid, fields) for mid, fields in messages]
        return self._buffer.pop(0)

    async def ack(self, delivery: Delivery) -> None:
        await self.redis.xack(STREAM, GROUP, delivery.message_id)

    async def retry_later(self, delivery: Delivery, delay_s: float) -> None:
        """Nothing to do: the message stays pending and is reclaimed after a lease."""

    async def close(self) -> None:
        await self.redis.aclose()
