"""What the benchmarks share: a model server as a subprocess, a closed-loop load of
concurrent gRPC callers, RSS of a process, goals, and the JSON each script writes
(`--json PATH`) for bench/run.py to collect."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.mesh.conftest (the shared mesh fixture)


class ServerProcess:
    """`aimesh serve KIND` as a subprocess with extra environment; its output is drained
    by a thread (a full pipe would stall it) and kept for error messages."""

    def __init__(self, kind: str, env: dict[str, str] | None = None, args: Sequence[str] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aimesh_servers.cli", "serve", kind, "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self.port = 0
        self._serving = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := re.search(r"serving .* on port (\d+)", line):
                self.port = int(m.group(1))
                self._serving.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 300) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while not self._serving.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start serving:\n" + "".join(self.lines))
        return self

    def rss_bytes(self) -> int:
        return rss_bytes(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class LoadResult:
    callers: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # gRPC status name -> count

    @property
    def calls_per_s(self) -> float:
        return len(self.latencies_s) / self.seconds

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000 if self.latencies_s else float("nan")

    @property
    def p99_ms(self) -> float:
        if len(self.latencies_s) < 2:
            return self.p50_ms
        return statistics.quantiles(self.latencies_s, n=100)[98] * 1000

    def summary(self) -> dict[str, Any]:
        return {"callers": self.callers, "calls": len(self.latencies_s), "seconds": round(self.seconds, 3),
                "calls_per_s": round(self.calls_per_s, 2), "p50_ms": round(self.p50_ms, 3),
                "p99_ms": round(self.p99_ms, 3), "errors": self.errors}


async def closed_loop(call: Callable[[int], Awaitable[object]], callers: int, *, seconds: float | None = None,
                      calls: int | None = None) -> LoadResult:
    """`callers` tasks each calling `call(caller index)` back to back, for `seconds` or until
    `calls` calls were made in all. Failed calls are counted by status, not timed."""
    if (seconds is None) == (calls is None):
        raise ValueError("give seconds or calls")
    result = LoadResult(callers, 0.0)
    started = time.perf_counter()
    deadline = started + seconds if seconds is not None else float("inf")
    budget = [calls if calls is not None else -1]

    async def caller(index: int) -> None:
        while time.perf_counter() < deadline:
            if budget[0] == 0:
                return
            budget[0] -= 1
            begin = time.perf_counter()
            try:
                await call(index)
            except grpc.aio.AioRpcError as exc:
                result.errors[exc.code().name] = result.errors.get(exc.code().name, 0) + 1
                continue
            result.latencies_s.append(time.perf_counter() - begin)

    await asyncio.gather(*(caller(i) for i in range(callers)))
    result.seconds = time.perf_counter() - started
    return result


async def timed_round_robin(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per run: one warm-up each, then the runs in turn, `repeats` times
    (interleaved, so that load from elsewhere on the machine hits all of them alike).
    A run may be a plain function or return a coroutine."""
    async def once(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        result = run()
        if asyncio.iscoroutine(result):
            await result
        return time.perf_counter() - start

    for run in runs.values():
        await once(run)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(await once(run))
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass
class Goal:
    name: str
    figure: float
    target: str  # e.g. ">= 3x"
    met: bool
    detail: str = ""

    def line(self) -> str:
        return f"  [{'met' if self.met else 'NOT MET'}] {self.name}: {self.figure:.3g} (goal {self.target})" + (
            f" - {self.detail}" if self.detail else "")


def report(benchmark: str, json_path: str | None, goals: Sequence[Goal], results: dict[str, Any],
           machine: dict[str, Any] | None = None) -> None:
    """Print the goals; write {benchmark, machine, goals, results} to `json_path` if given."""
    if goals:
        print("goals:")
        for goal in goals:
            print(goal.line())
    if json_path:
        payload = {"benchmark": benchmark, "machine": machine or machine_info(),
                   "goals": [asdict(g) for g in goals], "results": results}
        Path(json_path).write_text(json.dumps(payload, indent=1))


def machine_info() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    # Other work on the machine skews absolute figures (ratios of one run much less): say how much there was.
    return {"cpu": model, "cores": os.cpu_count(), "python": sys.version.split()[0],
            "load_average": [round(x, 2) for x in os.getloadavg()]}
