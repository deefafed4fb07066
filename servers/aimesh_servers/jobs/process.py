"""Job workers as processes: `aimesh worker` (one Redis consumer running items), and
the supervisor `aimesh up --redis --job-workers N` runs them under (restarted when they
crash, stopped with the mesh)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from ..mesh.children import terminate_with_parent
from ..registry.schema import load_registry
from ..tenancy.db import make_engine, migrate, sqlite_url
from ..tenancy.store import TenantStore
from .queue import RedisQueue
from .results import FileResultStore
from .settings import JobSettings
from .store import JobStore
from .system import results_dir
from .worker import JobRunner, TokenMinter, model_limits, worker_id

RESTART_DELAY_S = 1.0


def add_worker_parser(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser("worker", help="run job items from the Redis queue (aimesh up starts these)")
    worker.add_argument("--front", default="127.0.0.1:8080", help="the front door items are sent through")
    worker.add_argument("--redis", default=os.environ.get("AIMESH_REDIS_URL"), required=False,
                        help="the job queue (env AIMESH_REDIS_URL)")
    worker.add_argument("--database", default=os.environ.get("AIMESH_DATABASE_URL"),
                        help="the jobs database (default: SQLite in the state dir; env AIMESH_DATABASE_URL)")
    worker.add_argument("--state-dir", default=".aimesh", help="results go to STATE_DIR/results")
    worker.add_argument("--registry", help="model registry file (default: the built-in one)")
    worker.add_argument("--workers", type=int, default=1,
                        help="worker processes sharing the batch share of each model (default 1)")
    worker.add_argument("--no-tenancy", action="store_true", help="call without tokens")
    worker.add_argument("--front-cert", help="the front door serves TLS with this certificate (PEM)")
    worker.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    if not args.redis:
        print("aimesh worker: --redis is required (without Redis, jobs run inside `aimesh up`)", file=sys.stderr)
        return 2
    return asyncio.run(_work(args))


async def _work(args: argparse.Namespace) -> int:
    settings = JobSettings.from_env()
    engine = make_engine(args.database or sqlite_url(args.state_dir))
    await asyncio.to_thread(migrate, engine)
    runner = JobRunner(
        JobStore(engine), FileResultStore(results_dir(args.state_dir)),
        RedisQueue(args.redis, worker_id(), settings.lease_s), args.front, settings,
        model_limits(load_registry(args.registry), settings.batch_share, args.workers),
        None if args.no_tenancy else TokenMinter(TenantStore(engine)), front_cert=args.front_cert)
    task = asyncio.create_task(runner.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    print(f"[aimesh-worker] {runner.name} taking job items, front door {args.front}", flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await runner.queue.close()
    engine.dispose()
    return 0


async def supervise_workers(count: int, args: argparse.Namespace, front: str, state: Path,
                            stop: asyncio.Event, say) -> None:  # type: ignore[no-untyped-def]
    """Runs `count` workers until `stop`; one that exits is started again."""
    command = [sys.executable, "-m", "aimesh_servers.cli", "worker", "--front", front, "--redis", args.redis,
               "--state-dir", str(state), "--workers", str(count)]
    if args.database:
        command += ["--database", args.database]
    if args.registry:
        command += ["--registry", args.registry]
    if args.no_tenancy:
        command.append("--no-tenancy")
    if args.tls_cert:
        command += ["--front-cert", str(Path(args.tls_cert).resolve())]

    async def one(index: int) -> None:
        log_path = state / "logs" / f"job-worker-{index}.log"
        while not stop.is_set():
            log = log_path.open("ab")
            proc = await asyncio.create_subprocess_exec(
                *terminate_with_parent(command), stdout=log, stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
            log.close()  # the child has its own copy
            say(f"job worker {index}: pid {proc.pid} (log: {log_path})")
            (state / f"job-worker-{index}.pid").write_text(str(proc.pid))
            waiter = asyncio.create_task(stop.wait())
            exited = asyncio.create_task(proc.wait())
            await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                exited.cancel()
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                return
            waiter.cancel()
            say(f"job worker {index}: exited with {proc.returncode}; starting another")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RESTART_DELAY_S)

    await asyncio.gather(*(one(i) for i in range(count)))
