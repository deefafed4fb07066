"""Waiting for a condition in tests: poll up to a generous deadline, never a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def poll(check: Callable[[], Any], what: str, timeout: float = 120.0, every: float = 0.2,
         ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """check() until it returns something truthy, which is returned; fails with the last
    thing it returned (or raised, for the exception types in `ignore`)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except ignore as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        time.sleep(every)
