"""The jobs part of a control plane: JobService, the store, the queue, the in-process
workers (without Redis) and the retention sweeper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from pathlib import Path

from sqlalchemy.engine import Engine

from ..registry.schema import Registry
from ..tenancy.store import TenantStore
from .queue import Delivery, ItemQueue, MemoryQueue, RedisQueue
from .results import FileResultStore, job_prefix
from .servicer import JobCapability, JobServicer
from .settings import JobSettings
from .store import JobStore
from .worker import JobRunner, TokenMinter, model_limits, worker_id

log = logging.getLogger(__name__)
SWEEP_INTERVAL_S = 60.0


def results_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "results"


class JobSystem:
    def __init__(self, registry: Registry, engine: Engine, tenants: TenantStore, *, state_dir: Path,
                 front: str, enforce: bool, redis_url: str | None, settings: JobSettings,
                 front_cert: str | None = None) -> None:
        self.registry = registry
        self.settings = settings
        self.front = front
        self.front_cert = front_cert
        self.redis_url = redis_url
        self.store = JobStore(engine, retention=timedelta(seconds=settings.retention_s))
        self.results = FileResultStore(results_dir(state_dir))
        self.queue: ItemQueue = (RedisQueue(redis_url, worker_id("-control"), settings.lease_s) if redis_url
                                 else MemoryQueue())
        self.token_for = TokenMinter(tenants) if enforce else None
        self.capability = JobCapability(JobServicer(self.store, self.results, self.queue, settings, enforce,
                                                    models=[model.id for model in registry.models]))
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Once the front door routes: re-enqueues the items a stopped mesh left unfinished,
        then runs the workers (in this process unless the queue is Redis) and the sweeper."""
        unfinished = await asyncio.to_thread(self.store.unfinished)
        if unfinished:
            log.info("jobs: resuming %d unfinished item(s)", len(unfinished))
            await self.queue.put(Delivery(job_id, index, model) for job_id, index, model in unfinished)
        self._tasks.append(asyncio.create_task(self._sweep()))
        if self.redis_url is None:
            runner = JobRunner(self.store, self.results, self.queue, self.front, self.settings,
                               model_limits(self.registry, self.settings.batch_share), self.token_for,
                               front_cert=self.front_cert)
            self._tasks.append(asyncio.create_task(runner.run()))

    async def _sweep(self) -> None:
        """Deletes the results and rows of jobs whose retention has ended."""
        while True:
            try:
                expired = await asyncio.to_thread(self.store.expired)
                for tenant, job_id in expired:
                    await asyncio.to_thread(self.results.delete_prefix, job_prefix(tenant, job_id))
                await asyncio.to_thread(self.store.delete_jobs, [job_id for _, job_id in expired])
            except Exception:
                log.exception("jobs: retention sweep failed; trying again later")
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.queue.close()
