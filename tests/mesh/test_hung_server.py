"""A hung server costs one per-try timeout, not the caller's deadline.

A chain of two text pools under steady load; the primary's server is frozen with SIGSTOP
(it keeps its port and its connections, and answers nothing: not calls, not health
checks). Calls in flight on it time out after the text capability's per-try timeout and
are hedged onto the secondary; Envoy then ejects the primary. Run with -s for figures.
"""

from __future__ import annotations

import asyncio
import signal
import time

import aimesh
import pytest
from aimesh_servers.control.servicer import EnvoyHealth

from tests.mesh.test_fallback import HI, Load, Result, chain, start, summary, wait_routed  # noqa: F401

# Two model servers and steady load on a shared 2-core machine: minutes, not seconds.
pytestmark = pytest.mark.timeout(900)


class PatientLoad(Load):
    """Load with 60 s deadlines: a call may wait for a stopped server as long as Envoy lets it."""

    def _run(self) -> None:
        with aimesh.Client(self.mesh.front, max_attempts=1, timeout=60) as client:
            while not self.stop.is_set():
                began = time.monotonic()
                try:
                    pool = client.text.generate("chat", HI, max_tokens=1).served_by.pool
                    self.results.append(Result(began - self.t0, time.monotonic() - began, pool))
                except aimesh.AimeshError as exc:
                    self.results.append(Result(began - self.t0, time.monotonic() - began, None, str(exc)))


def _p99(rows) -> float:
    lat = sorted(r.latency for r in rows)
    return lat[min(len(lat) - 1, int(len(lat) * 0.99))]


def test_sigstop_of_the_primary_under_load_loses_no_call(chain):  # noqa: F811
    primary, secondary = start(chain, "primary"), start(chain, "secondary")
    try:
        wait_routed(chain, "primary")
        load = PatientLoad(chain, callers=3)  # one attempt each (no SDK retry)
        deadline = time.monotonic() + 300  # a shared 2-core machine can be very slow
        while sum(r.pool == "primary" for r in list(load.results)) < 6:
            assert time.monotonic() < deadline, f"no steady load on the primary: {load.results[-3:]}"
            time.sleep(0.1)
        stopped_at = load.now()
        primary.terminate(signal.SIGSTOP)
        try:
            # Until 10 calls that began after the stop were served by the secondary.
            while sum(r.at > stopped_at and r.pool == "secondary" for r in list(load.results)) < 10:
                assert time.monotonic() < deadline + 300, "calls never moved to the secondary"
                time.sleep(0.1)
            results = load.finish()
        finally:
            primary.terminate(signal.SIGCONT)
        # Thawed, it passes Envoy's health checks again.
        health = EnvoyHealth(f"http://127.0.0.1:{chain.admin_port}")
        while f"127.0.0.1:{primary.port}" not in (asyncio.run(health.healthy_endpoints()) or {}).get(
                "model_chat", ()):
            assert time.monotonic() < deadline + 600, "the thawed primary never became healthy"
            time.sleep(0.2)
    finally:
        primary.stop()
        secondary.stop()
    before = [r for r in results if r.at + r.latency < stopped_at]
    # Calls in flight at the stop or started after it.
    after = [r for r in results if r.at + r.latency >= stopped_at]
    print(summary("SIGSTOP before", before))
    print(summary("SIGSTOP in flight or after", after))
    print(f"SIGSTOP added p99: {(_p99(after) - _p99(before)) * 1000:.0f} ms "
          f"(the text per-try timeout, then the hedge on the secondary)")
    failed = [r for r in results if r.pool is None]
    assert not failed, f"{len(failed)} of {len(results)} calls failed: {failed[:3]}"
    # Nothing answers from the frozen primary: what was in flight there was hedged onto the
    # secondary (a slow but live primary may also lose calls to the hedge before the stop).
    assert all(r.pool == "secondary" for r in after if r.at > stopped_at)
