"""A burst of callers through a real mesh: does admission answer or refuse honestly?

Starts `aimesh up --only text --no-tenancy` (admission is measured, not tenant limits)
and runs closed-loop callers of 1-token text `Generate` calls through the Envoy front
door (each caller its own client, with the SDK's default deadline, calling again as soon
as a call ends, or when a refusal's RetryInfo says):

1. 64 callers, SDK retries off: answered calls/s, calls refused with RESOURCE_EXHAUSTED
   + RetryInfo (an honest "come back in X s"), and calls that failed any other way;
2. 32 callers, SDK retries on (the default client: a busy refusal is retried once after
   its RetryInfo, within the call's deadline): failed calls.

    .venv/bin/python bench/bench_burst.py [--seconds 60] [--json burst.json]

Goals: (1) nothing but RESOURCE_EXHAUSTED-with-RetryInfo refused, 0 other errors;
(2) 0 failed calls with SDK retries on at 32 callers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aimesh

from tests.mesh.conftest import Mesh

MODEL = "smollm2-135m"
HI = [("user", "Hi")]


@dataclass
class Phase:
    name: str
    callers: int
    retries: bool
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    refused_with_retry_info: Counter[str] = field(default_factory=Counter)  # reason -> calls
    failed: Counter[str] = field(default_factory=Counter)  # "CODE REASON" -> calls

    @property
    def answered_per_s(self) -> float:
        return len(self.latencies_s) / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def summary(self) -> dict[str, Any]:
        return {"callers": self.callers, "sdk_retries": self.retries, "seconds": round(self.seconds, 2),
                "answered": len(self.latencies_s), "answered_per_s": round(self.answered_per_s, 2),
                "p50_ms": round(self.percentile_ms(0.5), 1), "p99_ms": round(self.percentile_ms(0.99), 1),
                "refused_with_retry_info": sum(self.refused_with_retry_info.values()),
                "refused_by_reason": dict(self.refused_with_retry_info),
                "failed": sum(self.failed.values()), "failed_by_status": dict(self.failed)}


async def run_phase(front: str, phase: Phase, seconds: float) -> Phase:
    """Closed loop: each caller calls again as soon as its call ended."""
    started = time.perf_counter()
    deadline = started + seconds

    async def caller() -> None:
        options: dict[str, Any] = {} if phase.retries else {"max_attempts": 1}
        async with aimesh.AsyncClient(front, **options) as client:
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                try:
                    await client.text.generate(MODEL, HI, max_tokens=1)
                except aimesh.AimeshError as exc:
                    busy = isinstance(exc, aimesh.ResourceExhaustedError) and exc.retry_after is not None
                    if busy and not phase.retries:
                        phase.refused_with_retry_info[exc.reason] += 1
                        # A polite caller: its next call comes when the refusal said.
                        await asyncio.sleep(min(exc.retry_after, max(0.0, deadline - time.perf_counter())))
                    else:  # with retries on, a call that still fails is a failed call
                        phase.failed[f"{exc.code.name} {exc.reason}".strip()] += 1
                    continue
                phase.latencies_s.append(time.perf_counter() - began)

    await asyncio.gather(*(caller() for _ in range(phase.callers)))
    phase.seconds = time.perf_counter() - started
    return phase


@dataclass
class Goal:
    name: str
    figure: float
    target: str
    met: bool

    def line(self) -> str:
        return f"  [{'met' if self.met else 'NOT MET'}] {self.name}: {self.figure:g} (goal {self.target})"


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0]}


async def measure(front: str, seconds: float) -> list[Phase]:
    async with aimesh.AsyncClient(front) as client:  # warm-up
        await client.text.generate(MODEL, HI, max_tokens=1)
    burst = await run_phase(front, Phase("burst, SDK retries off", 64, retries=False), seconds)
    retried = await run_phase(front, Phase("SDK retries on", 32, retries=True), seconds)
    return [burst, retried]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mesh = Mesh(Path(tmp), only=["text"])
        try:
            mesh.wait_ready()
            burst, retried = asyncio.run(measure(mesh.front, args.seconds))
        finally:
            mesh.stop()

    print(f"\n1-token text Generate through Envoy ({MODEL}, `aimesh up --only text`), "
          f"{args.seconds:g} s per phase, closed loop")
    header = (f"  {'phase':24s} {'callers':>7s} {'answered/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} "
              f"{'refused+RetryInfo':>17s} {'failed':>7s}")
    print(header)
    for phase in (burst, retried):
        refused = "-" if phase.retries else str(sum(phase.refused_with_retry_info.values()))
        print(f"  {phase.name:24s} {phase.callers:7d} {phase.answered_per_s:10.1f} "
              f"{phase.percentile_ms(0.5):8.0f} {phase.percentile_ms(0.99):8.0f} "
              f"{refused:>17s} {sum(phase.failed.values()):7d}")
        for reason, count in phase.refused_with_retry_info.most_common():
            print(f"      refused with RetryInfo: {count} x {reason}")
        for status, count in phase.failed.most_common():
            print(f"      failed: {count} x {status}")
    refused = sum(burst.refused_with_retry_info.values())
    burst_total = len(burst.latencies_s) + refused + sum(burst.failed.values())
    if burst_total:
        print(f"  burst: {len(burst.latencies_s) / burst_total:.1%} of calls answered, "
              f"{refused / burst_total:.1%} refused with RetryInfo")
    goals = [
        Goal("64-caller burst: calls failed other than RESOURCE_EXHAUSTED+RetryInfo",
             sum(burst.failed.values()), "0", not burst.failed),
        Goal("32 callers, SDK retries on: failed calls", sum(retried.failed.values()), "0",
             not retried.failed),
    ]
    print("goals:")
    for goal in goals:
        print(goal.line())
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "burst", "machine": machine(), "goals": [asdict(g) for g in goals],
            "results": {"seconds_per_phase": args.seconds, "burst": burst.summary(),
                        "sdk_retries": retried.summary()},
        }, indent=1))


if __name__ == "__main__":
    main()
