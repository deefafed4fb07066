"""Job state in the tenancy database (tables `jobs` and `job_items`, migration 0002).

Every read and change is scoped to a tenant, except the workers' calls (claim, renew,
finish), which name an item. An item is run under a lease: `claim` hands it to one
worker until `lease_until` (renewed while it runs); a worker that dies leaves an
expired lease, and the item is claimed again by another. An item whose result is
stored is final and never claimed again. Changes to one job are serialized (row lock on
PostgreSQL, the write lock on SQLite), so the last item to finish always closes the job.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..runtime.errors import JobNotFound
from ..tenancy.db import WRITE_LOCK_OPTION, job_items, jobs

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL = (SUCCEEDED, FAILED, CANCELLED)
WORKFLOW = "workflow"  # the kind of a job whose items are steps run in order (jobs/workflow.py)


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant: str
    capability: str
    model: str
    kind: str
    display_name: str
    idempotency_key: str | None
    state: str
    total: int
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    expire_at: datetime | None
    counts: dict[str, int] = field(default_factory=dict)  # item state -> items

    @property
    def name(self) -> str:
        return f"jobs/{self.id}"

    @property
    def finished(self) -> bool:
        return self.state in FINAL


@dataclass(frozen=True)
class ItemRecord:
    index: int
    state: str
    attempts: int
    result_key: str | None
    error_reason: str | None
    error_message: str | None
    error_status: bytes | None


@dataclass(frozen=True)
class Claim:
    """An item a worker now holds: what to run, and for whom."""

    job_id: str
    index: int
    tenant: str
    capability: str
    model: str
    kind: str
    request: bytes
    attempt: int
    previous_request: bytes | None = None  # a workflow step after the first: the step before


@dataclass(frozen=True)
class Refusal:
    """Why an item was not handed out: it is final (`done`), or another worker's lease
    runs until `retry_at`."""

    done: bool
    retry_at: datetime | None = None


@dataclass(frozen=True)
class ItemError:
    reason: str
    message: str
    status: bytes  # google.rpc.Status


def _job(row: sa.Row, counts: dict[str, int]) -> JobRecord:
    return JobRecord(
        id=row.id, tenant=row.tenant, capability=row.capability, model=row.model, kind=row.kind,
        display_name=row.display_name, idempotency_key=row.idempotency_key, state=row.state,
        total=row.total, created_at=row.created_at, started_at=row.started_at, ended_at=row.ended_at,
        expire_at=row.expire_at, counts=counts)


class JobStore:
    def __init__(self, engine: Engine, *, retention: timedelta = timedelta(days=7),
                 clock: Callable[[], datetime] | None = None) -> None:
        self.engine = engine
        self.retention = retention
        self.clock = clock or (lambda: datetime.now(UTC))

    def _writer(self) -> Connection:
        return self.engine.connect().execution_options(**{WRITE_LOCK_OPTION: True})

    @staticmethod
    def _lock_job(conn: Connection, job_id: str) -> sa.Row | None:
        return conn.execute(jobs.select().where(jobs.c.id == job_id).with_for_update()).one_or_none()

    @staticmethod
    def _counts(conn: Connection, job_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {job_id: {} for job_id in job_ids}
        if job_ids:
            query = (sa.select(job_items.c.job_id, job_items.c.state, sa.func.count())
                     .where(job_items.c.job_id.in_(job_ids))
                     .group_by(job_items.c.job_id, job_items.c.state))
            for job_id, state, count in conn.execute(query):
                out[job_id][state] = count
        return out

    def _visible(self, tenant: str):  # type: ignore[no-untyped-def]
        """Jobs of `tenant` whose retention has not ended."""
        return sa.and_(jobs.c.tenant == tenant,
                       sa.or_(jobs.c.expire_at.is_(None), jobs.c.expire_at > self.clock()))

    # --- tenants' calls ------------------------------------------------------------------

    def create_job(self, tenant: str, *, kind: str, capability: str, model: str,
                   requests: Sequence[bytes], idempotency_key: str = "",
                   display_name: str = "") -> tuple[JobRecord, bool]:
        """A new queued job, and True; or, for an idempotency key the tenant used before,
        that job and False."""
        key = idempotency_key or None
        if key is not None and (earlier := self._by_key(tenant, key)) is not None:
            return earlier, False
        job_id = secrets.token_hex(8)
        try:
            with self._writer() as conn, conn.begin():
                conn.execute(jobs.insert().values(
                    id=job_id, tenant=tenant, capability=capability, model=model, kind=kind,
                    display_name=display_name, idempotency_key=key, state=QUEUED, total=len(requests),
                    created_at=self.clock()))
                conn.execute(job_items.insert(), [
                    {"job_id": job_id, "idx": i, "request": raw, "state": QUEUED, "attempts": 0}
                    for i, raw in enumerate(requests)])
        except sa.exc.IntegrityError:  # the same key submitted at the same moment
            if key is not None and (earlier := self._by_key(tenant, key)) is not None:
                return earlier, False
            raise
        return self.get_job(tenant, job_id), True

    def _by_key(self, tenant: str, key: str) -> JobRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(jobs.select().where(
                self._visible(tenant), jobs.c.idempotency_key == key)).one_or_none()
            return None if row is None else _job(row, self._counts(conn, [row.id])[row.id])

    def get_job(self, tenant: str, job_id: str) -> JobRecord:
        with self.engine.connect() as conn:
            row = conn.execute(jobs.select().where(self._visible(tenant), jobs.c.id == job_id)).one_or_none()
            if row is None:
                raise JobNotFound(f"jobs/{job_id}")
            return _job(row, self._counts(conn, [job_id])[job_id])

    def list_jobs(self, tenant: str, *, state: str | None = None, limit: int = 50,
                  offset: int = 0) -> list[JobRecord]:
        """Newest first."""
        query = jobs.select().where(self._visible(tenant))
        if state:
            query = query.where(jobs.c.state == state)
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.id).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
            counts = self._counts(conn, [row.id for row in rows])
        return [_job(row, counts[row.id]) for row in rows]

    def cancel_job(self, tenant: str, job_id: str) -> JobRecord:
        """Items not finished become cancelled (a worker running one loses its lease and
        stops); a finished job is left as it is."""
        now = self.clock()
        with self._writer() as conn, conn.begin():
            row = self._lock_job(conn, job_id)
            if row is None or row.tenant != tenant or (row.expire_at is not None and row.expire_at <= now):
                raise JobNotFound(f"jobs/{job_id}")
            if row.state not in FINAL:
                conn.execute(job_items.update().where(
                    job_items.c.job_id == job_id, job_items.c.state.in_((QUEUED, RUNNING)),
                ).values(state=CANCELLED, leased_by=None, lease_until=None))
                conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                    state=CANCELLED, ended_at=now, expire_at=now + self.retention))
        return self.get_job(tenant, job_id)

    def list_items(self, tenant: str, job_id: str, *, start: int = 0, limit: int = 100) -> list[ItemRecord]:
        self.get_job(tenant, job_id)  # NOT_FOUND for another tenant's job
        query = (sa.select(job_items.c.idx, job_items.c.state, job_items.c.attempts, job_items.c.result_key,
                           job_items.c.error_reason, job_items.c.error_message, job_items.c.error_status)
                 .where(job_items.c.job_id == job_id, job_items.c.idx >= start)
                 .order_by(job_items.c.idx).limit(limit))
        with self.engine.connect() as conn:
            return [ItemRecord(*row) for row in conn.execute(query)]

    # --- workers' calls ------------------------------------------------------------------

    def claim(self, job_id: str, index: int, worker: str, lease: timedelta) -> Claim | Refusal:
        """Hands the item to `worker` until now + lease: when it is queued, or running
        under an expired lease (its worker died)."""
        now = self.clock()
        with self._writer() as conn, conn.begin():
            job = self._lock_job(conn, job_id)
            if job is None:
                return Refusal(done=True)
            item = conn.execute(job_items.select().where(
                job_items.c.job_id == job_id, job_items.c.idx == index)).one_or_none()
            if item is None or item.state in FINAL:
                return Refusal(done=True)
            previous = None
            if job.kind == WORKFLOW and index > 0:
                previous = conn.execute(job_items.select().where(
                    job_items.c.job_id == job_id, job_items.c.idx == index - 1)).one()
                if previous.state != SUCCEEDED:  # too early: it is enqueued when that step succeeds
                    return Refusal(done=True)
            if item.state == RUNNING and item.lease_until is not None and item.lease_until > now \
                    and item.leased_by != worker:
                return Refusal(done=False, retry_at=item.lease_until)
            conn.execute(job_items.update().where(
                job_items.c.job_id == job_id, job_items.c.idx == index,
            ).values(state=RUNNING, leased_by=worker, lease_until=now + lease, attempts=item.attempts + 1))
            if job.state == QUEUED:
                conn.execute(jobs.update().where(jobs.c.id == job_id).values(state=RUNNING, started_at=now))
        return Claim(job_id=job_id, index=index, tenant=job.tenant, capability=job.capability,
                     model=job.model, kind=job.kind, request=item.request, attempt=item.attempts + 1,
                     previous_request=previous.request if previous is not None else None)

    def renew(self, job_id: str, index: int, worker: str, lease: timedelta) -> bool:
        """Extends the worker's lease; False when it no longer holds the item (cancelled,
        or its lease ran out and another worker took it)."""
        with self.engine.begin() as conn:
            done = conn.execute(job_items.update().where(
                job_items.c.job_id == job_id, job_items.c.idx == index,
                job_items.c.state == RUNNING, job_items.c.leased_by == worker,
            ).values(lease_until=self.clock() + lease))
            return done.rowcount == 1

    def finish(self, job_id: str, index: int, worker: str, *, result_key: str | None = None,
               error: ItemError | None = None) -> bool:
        """Records the item's result (or error) if the worker still holds it, and closes
        the job when it was the last item. False: the result is not the item's (dropped)."""
        now = self.clock()
        values: dict[str, object] = {"leased_by": None, "lease_until": None}
        if error is None:
            values.update(state=SUCCEEDED, result_key=result_key)
        else:
            values.update(state=FAILED, error_reason=error.reason, error_message=error.message,
                          error_status=error.status)
        with self._writer() as conn, conn.begin():
            job = self._lock_job(conn, job_id)
            if job is None:
                return False
            done = conn.execute(job_items.update().where(
                job_items.c.job_id == job_id, job_items.c.idx == index,
                job_items.c.state == RUNNING, job_items.c.leased_by == worker,
            ).values(**values))
            if done.rowcount != 1:
                return False
            workflow = job.kind == WORKFLOW
            if workflow and error is not None:  # a failed step ends its workflow
                conn.execute(job_items.update().where(
                    job_items.c.job_id == job_id, job_items.c.idx > index, job_items.c.state == QUEUED,
                ).values(state=CANCELLED))
            counts = self._counts(conn, [job_id])[job_id]
            if job.state not in FINAL and not counts.get(QUEUED) and not counts.get(RUNNING):
                succeeded = counts.get(SUCCEEDED, 0) == job.total if workflow else counts.get(SUCCEEDED)
                conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                    state=SUCCEEDED if succeeded else FAILED, ended_at=now, expire_at=now + self.retention))
        return True

    def next_step(self, job_id: str, index: int) -> bytes | None:
        """A workflow's step after `index` when that one succeeded and the next still waits
        (its request, to enqueue it); else None."""
        with self.engine.connect() as conn:
            job = conn.execute(jobs.select().where(jobs.c.id == job_id)).one_or_none()
            if job is None or job.kind != WORKFLOW or job.state in FINAL:
                return None
            rows = {row.idx: row for row in conn.execute(job_items.select().where(
                job_items.c.job_id == job_id, job_items.c.idx.in_((index, index + 1))))}
        if index in rows and index + 1 in rows and rows[index].state == SUCCEEDED \
                and rows[index + 1].state == QUEUED:
            return rows[index + 1].request
        return None

    def unfinished(self) -> list[tuple[str, int, str]]:
        """(job id, item, model) of every item still to run, oldest job first: re-enqueued
        at start (a restarted mesh resumes its jobs)."""
        query = (sa.select(job_items.c.job_id, job_items.c.idx, jobs.c.model)
                 .join(jobs, jobs.c.id == job_items.c.job_id)
                 .where(job_items.c.state.in_((QUEUED, RUNNING)))
                 .order_by(jobs.c.created_at, job_items.c.job_id, job_items.c.idx))
        with self.engine.connect() as conn:
            return [(job_id, idx, model) for job_id, idx, model in conn.execute(query)]

    # --- retention -----------------------------------------------------------------------

    def expired(self) -> list[tuple[str, str]]:
        """(tenant, job id) of the jobs whose retention has ended."""
        query = sa.select(jobs.c.tenant, jobs.c.id).where(jobs.c.expire_at <= self.clock())
        with self.engine.connect() as conn:
            return [(tenant, job_id) for tenant, job_id in conn.execute(query)]

    def delete_jobs(self, job_ids: Iterable[str]) -> None:
        ids = list(job_ids)
        if ids:
            with self.engine.begin() as conn:
                conn.execute(job_items.delete().where(job_items.c.job_id.in_(ids)))
                conn.execute(jobs.delete().where(jobs.c.id.in_(ids)))
