"""Jobs through a real mesh (`aimesh up --only embedding --no-tenancy`: Envoy, one
embedding server, JobService and in-process workers in the control process), every
figure against its baseline in the same run:

- batch throughput: N embedding requests as one batch job (submit -> last result
  stored) against the same N requests sent one by one by one caller;
- jobs/s: M single-request jobs submitted and finished, end to end;
- interactive p95: one caller's embedding calls alone, then while a batch runs (the
  batch keeps at most AIMESH_JOB_BATCH_SHARE of the pool's slots, default 0.5).

With --redis the queue is a real redis-server and one `aimesh worker` process runs the
items (instead of workers inside the control process).

    .venv/bin/python bench/bench_jobs.py [--quick] [--redis] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aimesh
import common  # bench/common.py
from aimesh.embedding.v1.embedding_pb2 import EmbedRequest
from aimesh.jobs.v1 import jobs_pb2 as pb

from tests.infra import redis_server
from tests.mesh.conftest import Mesh

MODEL = "all-minilm-l6-v2"


def requests(count: int, tag: str) -> list[EmbedRequest]:
    return [EmbedRequest(model=MODEL, texts=[f"{tag} request number {i} routes through the mesh"])
            for i in range(count)]


def one_by_one(client: aimesh.Client, count: int) -> float:
    start = time.perf_counter()
    for request in requests(count, "single"):
        client.embedding.embed(MODEL, list(request.texts))
    return time.perf_counter() - start


def as_batch(client: aimesh.Client, count: int, tag: str = "batch") -> float:
    start = time.perf_counter()
    job = client.jobs.submit(requests(count, tag))
    done = client.jobs.wait(job, timeout=1800)
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.progress.succeeded == count, done
    return time.perf_counter() - start


def many_jobs(client: aimesh.Client, count: int) -> float:
    start = time.perf_counter()
    jobs = [client.jobs.submit(requests(1, f"job {i}")) for i in range(count)]
    for job in jobs:
        assert client.jobs.wait(job, timeout=600).state == pb.JOB_STATE_SUCCEEDED
    return time.perf_counter() - start


def poll_running(client: aimesh.Client, job: pb.Job) -> None:
    """Until the batch has items in flight (it has taken its share of the pool)."""
    deadline = time.monotonic() + 120
    while client.jobs.get(job).progress.running == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the background batch did not start")
        time.sleep(0.05)


def interactive_latencies(client: aimesh.Client, seconds: float) -> list[float]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.perf_counter()
        client.embedding.embed(MODEL, ["how long does an interactive call wait behind a batch?"])
        out.append(time.perf_counter() - start)
    return out


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 20 else max(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests and shorter phases")
    parser.add_argument("--items", type=int, help="requests in the batch (default 200, quick 60)")
    parser.add_argument("--jobs", type=int, help="single-request jobs (default 50, quick 20)")
    parser.add_argument("--seconds", type=float, help="each interactive phase (default 15, quick 6)")
    parser.add_argument("--redis", action="store_true",
                        help="queue on a real redis-server, items run by one `aimesh worker` process")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    items = args.items or (60 if args.quick else 200)
    job_count = args.jobs or (20 if args.quick else 50)
    seconds = args.seconds or (6.0 if args.quick else 15.0)

    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as state, contextlib.ExitStack() as stack:
        queue_args = ["--redis", stack.enter_context(redis_server()), "--job-workers", "1"] if args.redis else []
        mesh = Mesh(Path(state), only=["embedding"], extra_args=queue_args)
        try:
            mesh.wait_ready()
            with aimesh.Client(mesh.front, timeout=60, max_attempts=1) as client:
                one_by_one(client, 10)  # warm up
                sequential_s = one_by_one(client, items)
                batch_s = as_batch(client, items)
                jobs_s = many_jobs(client, job_count)
                alone = interactive_latencies(client, seconds)
                background = client.jobs.submit(requests(min(items * 10, 1000), "background"))
                poll_running(client, background)
                beside = interactive_latencies(client, seconds)
                batch_running = client.jobs.get(background).state == pb.JOB_STATE_RUNNING
                client.jobs.cancel(background)
        finally:
            mesh.stop()

    results: dict[str, Any] = {
        "items": items, "sequential_items_per_s": items / sequential_s, "batch_items_per_s": items / batch_s,
        "batch_vs_sequential": sequential_s / batch_s, "jobs": job_count, "jobs_per_s": job_count / jobs_s,
        "interactive_p95_alone_ms": p95(alone) * 1000, "interactive_p95_with_batch_ms": p95(beside) * 1000,
        "interactive_calls": [len(alone), len(beside)], "batch_ran_throughout": batch_running,
        "queue": "redis" if args.redis else "in-process",
    }
    ratio = results["interactive_p95_with_batch_ms"] / results["interactive_p95_alone_ms"]
    print(f"queue: {results['queue']}")
    print(f"one by one:  {results['sequential_items_per_s']:.1f} requests/s ({items} embedding calls, 1 caller)")
    print(f"as a batch:  {results['batch_items_per_s']:.1f} requests/s ({results['batch_vs_sequential']:.2f}x one by one)")
    print(f"jobs:        {results['jobs_per_s']:.1f} single-request jobs/s (submit -> finished)")
    print(f"interactive: p95 {results['interactive_p95_alone_ms']:.1f} ms alone, "
          f"{results['interactive_p95_with_batch_ms']:.1f} ms beside a batch ({ratio:.2f}x; "
          f"{len(alone)} and {len(beside)} calls; batch running throughout: {batch_running})")
    goals = [common.Goal("interactive p95 beside a batch / alone", ratio, "<= 2x", ratio <= 2.0)]
    common.report("jobs", args.json, goals, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
