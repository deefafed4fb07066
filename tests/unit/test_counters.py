"""Windowed counters: in memory, and in a real redis-server shared by two control planes."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis
from aimesh_servers.tenancy.counters import CountersUnavailable, MemoryCounters, RedisCounters

from tests.infra import redis_server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_counters_add_and_expire() -> None:
    clock = Clock()
    counters = MemoryCounters(clock=clock)
    assert counters.add("a", 2, ttl_s=10) == 2
    assert counters.add("a", 1.5, ttl_s=10) == 3.5
    assert counters.get_many(["a", "b"]) == {"a": 3.5, "b": 0.0}
    clock.now += 9.9
    assert counters.get_many(["a"]) == {"a": 3.5}
    clock.now += 0.2
    assert counters.get_many(["a"]) == {"a": 0.0}
    # The next window of the same key starts from 0 with a fresh time to live.
    assert counters.add("a", 1, ttl_s=10) == 1


def test_memory_counters_are_thread_safe() -> None:
    counters = MemoryCounters()
    threads = [
        threading.Thread(target=lambda: [counters.add("k", 1, ttl_s=60) for _ in range(2000)])
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert counters.get_many(["k"]) == {"k": 16000}


def test_redis_counters_are_shared_between_two_control_planes(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    first, second = RedisCounters(redis_url, prefix=prefix), RedisCounters(redis_url, prefix=prefix)
    try:
        assert first.add("acme:text:requests:60:1", 1, ttl_s=60) == 1
        assert second.add("acme:text:requests:60:1", 2.5, ttl_s=60) == 3.5
        assert first.get_many(["acme:text:requests:60:1", "other"]) == {
            "acme:text:requests:60:1": 3.5, "other": 0.0,
        }
        assert first.get_many([]) == {}
        # The first add sets the time to live; later adds keep it.
        raw = redis.Redis.from_url(redis_url, socket_timeout=5)
        ttl = raw.ttl(prefix + "acme:text:requests:60:1")
        assert 0 < ttl <= 60
        second.add("acme:text:requests:60:1", 1, ttl_s=3600)
        assert raw.ttl(prefix + "acme:text:requests:60:1") <= 60
        raw.close()
    finally:
        first.close()
        second.close()


def test_redis_counters_concurrent_adds_are_atomic(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    planes = [RedisCounters(redis_url, prefix=prefix) for _ in range(4)]
    threads = [
        threading.Thread(target=lambda c=c: [c.add("k", 0.5, ttl_s=60) for _ in range(200)]) for c in planes
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert planes[0].get_many(["k"]) == {"k": 400.0}
    for plane in planes:
        plane.close()


def test_redis_outage_raises_counters_unavailable() -> None:
    with redis_server() as url:
        counters = RedisCounters(url)
        assert counters.add("k", 1, ttl_s=60) == 1
    # The server is stopped now.
    with pytest.raises(CountersUnavailable):
        counters.add("k", 1, ttl_s=60)
    with pytest.raises(CountersUnavailable):
        counters.get_many(["k"])
    counters.close()
