"""Every benchmark in one command: runs each bench/bench_*.py in turn (with --quick where
the script has it, and --json to a file of its own), collects their JSON into one file,
and prints one table of the goals, met or not met, with their figures. A script that
fails, runs past its time, or writes no JSON is reported as such; the others still run.

    .venv/bin/python bench/run.py results.json [--quick] [--only embedding overhead] [--skip text]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine_info  # bench/common.py

BENCH = Path(__file__).resolve().parent
# --quick for scripts that have no --quick flag of their own (measured: burst's default 60 s
# phases took 393 s of a 1288 s suite).
QUICK_ARGS = {"bench_burst.py": ["--seconds", "15"]}


def scripts(only: list[str] | None, skip: list[str]) -> list[Path]:
    found = sorted(BENCH.glob("bench_*.py"))
    names = {p.stem.removeprefix("bench_"): p for p in found}
    unknown = sorted((set(only or []) | set(skip)) - set(names))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; known: {sorted(names)}")
    return [p for name, p in names.items() if (not only or name in only) and name not in skip]


def accepts(script: Path, flag: str) -> bool:
    """Whether the script's argument parser defines `flag` (read from its source: no import needed)."""
    return f'"{flag}"' in script.read_text()


def run_one(script: Path, quick: bool, timeout_s: float, folder: Path) -> dict[str, Any]:
    name = script.stem.removeprefix("bench_")
    out = folder / f"{name}.json"
    args = [sys.executable, str(script)]
    if quick and accepts(script, "--quick"):
        args.append("--quick")
    elif quick:
        args += QUICK_ARGS.get(script.name, [])
    if accepts(script, "--json"):
        args += ["--json", str(out)]
    print(f"\n=== {name}: {' '.join(args[1:])}", flush=True)
    started = time.monotonic()
    entry: dict[str, Any] = {"script": script.name, "args": args[2:]}
    try:
        # Output goes straight to the terminal: a benchmark's own table is worth reading.
        code = subprocess.run(args, timeout=timeout_s, cwd=BENCH.parent, stdin=subprocess.DEVNULL, check=False,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        entry["status"] = "ok" if code == 0 else f"exit {code}"
    except subprocess.TimeoutExpired:
        entry["status"] = f"timed out after {timeout_s:g} s"
    entry["seconds"] = round(time.monotonic() - started, 1)
    if out.exists():
        try:
            entry["output"] = json.loads(out.read_text())
        except json.JSONDecodeError as exc:
            entry["json_error"] = str(exc)
    else:
        entry["json_error"] = "no JSON written" if accepts(script, "--json") else "the script has no --json flag"
    return entry


def summary(entries: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"{'benchmark':14s} {'status':22s} {'time':>7s}  goal"]
    for name, entry in entries.items():
        goals = (entry.get("output") or {}).get("goals") or []
        head = f"{name:14s} {entry['status']:22s} {entry['seconds']:6.0f}s"
        if not goals:
            lines.append(f"{head}  ({entry.get('json_error') or 'no goals reported'})")
        for k, goal in enumerate(goals):
            figure = goal.get("figure")
            figure_text = f"{figure:.3g}" if isinstance(figure, (int, float)) else str(figure)
            mark = "met" if goal.get("met") else "NOT MET"
            lines.append(f"{head if k == 0 else ' ' * len(head)}  [{mark}] {goal.get('name')}: "
                         f"{figure_text} (goal {goal.get('target')})")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="where the collected results go (JSON)")
    parser.add_argument("--quick", action="store_true", help="pass --quick to the scripts that have it")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these (bench_NAME.py)")
    parser.add_argument("--skip", nargs="+", default=[], metavar="NAME", help="all but these")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one script may run (default 900)")
    args = parser.parse_args()

    started = time.monotonic()
    load_before = os.getloadavg()
    entries: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="aimesh-bench-") as tmp:
        for script in scripts(args.only, args.skip):
            entries[script.stem.removeprefix("bench_")] = run_one(script, args.quick, args.timeout, Path(tmp))
    goals = [g for e in entries.values() for g in (e.get("output") or {}).get("goals") or []]
    result = {
        "machine": {**machine_info(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "quick": args.quick, "seconds": round(time.monotonic() - started, 1),
        "goals_met": sum(bool(g.get("met")) for g in goals), "goals": len(goals),
        "benchmarks": entries,
    }
    Path(args.output).write_text(json.dumps(result, indent=1))
    machine = result["machine"]
    print(f"\n=== summary: {result['goals_met']} of {len(goals)} goals met, {result['seconds']:.0f} s, "
          f"{machine['cores']} cores ({machine['cpu']}), load average {load_before[0]:.1f} -> "
          f"{machine['load_average_after'][0]:.1f}; results in {args.output}")
    for line in summary(entries):
        print(line)
    failed = [name for name, e in entries.items() if e["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
