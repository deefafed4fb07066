"""Windowed counters for tenant limits: in memory (one process) or in Redis (shared by
every control plane).

A counter is a float under a key that the quota controller chooses (it puts the window
in the key, e.g. ``acme:text:requests:60:<window index>``); the first ``add`` to a key
sets its time to live, so a finished window's counters disappear by themselves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Protocol


class CountersUnavailable(Exception):
    """The shared counter store cannot be reached; the caller decides fail-open or closed."""


class WindowCounters(Protocol):
    def add(self, key: str, amount: float, ttl_s: int) -> float:
        """Adds amount to key (created at 0 with ttl_s to live) and returns the new total."""
        ...

    def get_many(self, keys: Iterable[str]) -> dict[str, float]:
        """The totals of keys; a missing or expired key is 0."""
        ...


class MemoryCounters:
    """Counters in this process, thread-safe; expired keys are swept as keys are added."""

    SWEEP_EVERY = 1024

    def __init__(self, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self._clock = clock
        self._lock = threading.Lock()
        self._values: dict[str, tuple[float, float]] = {}  # key -> (total, expires at)
        self._adds_since_sweep = 0

    def add(self, key: str, amount: float, ttl_s: int) -> float:
        now = self._clock()
        with self._lock:
            total, expires = self._values.get(key, (0.0, 0.0))
            if expires <= now:
                total, expires = 0.0, now + ttl_s
            total += amount
            self._values[key] = (total, expires)
            self._adds_since_sweep += 1
            if self._adds_since_sweep >= self.SWEEP_EVERY:
                self._adds_since_sweep = 0
                self._values = {k: v for k, v in self._values.items() if v[1] > now}
            return total

    def get_many(self, keys: Iterable[str]) -> dict[str, float]:
        now = self._clock()
        with self._lock:
            result = {}
            for key in keys:
                total, expires = self._values.get(key, (0.0, 0.0))
                result[key] = total if expires > now else 0.0
            return result


# INCRBYFLOAT and the first EXPIRE in one atomic step: a crash between the two can never
# leave a key without a time to live.
_ADD_SCRIPT = """
local total = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return total
"""


class RedisCounters:
    """Counters in Redis, shared by every process that uses the same URL and prefix."""

    def __init__(self, url: str, *, prefix: str = "aimesh:counters:", timeout_s: float = 0.5) -> None:
        import redis

        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._prefix = prefix
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30
        )
        self._add = self._client.register_script(_ADD_SCRIPT)

    def add(self, key: str, amount: float, ttl_s: int) -> float:
        try:
            return float(self._add(keys=[self._prefix + key], args=[repr(float(amount)), int(ttl_s)]))
        except self._errors as exc:
            raise CountersUnavailable(f"redis counters unreachable: {exc}") from exc

    def get_many(self, keys: Iterable[str]) -> dict[str, float]:
        keys = list(keys)
        if not keys:
            return {}
        try:
            values = self._client.mget([self._prefix + key for key in keys])
        except self._errors as exc:
            raise CountersUnavailable(f"redis counters unreachable: {exc}") from exc
        return {key: float(value) if value is not None else 0.0 for key, value in zip(keys, values, strict=True)}

    def close(self) -> None:
        self._client.close()
