"""JobStore on a real database: SQLite (a file, WAL) and PostgreSQL (a real server, started
once per session by tests/infra.py), migrated by Alembic like `aimesh up` does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aimesh_servers.jobs.results import FileResultStore, job_prefix, result_key
from aimesh_servers.jobs.store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    WORKFLOW,
    Claim,
    ItemError,
    JobNotFound,
    JobStore,
    Refusal,
)
from aimesh_servers.tenancy.db import make_engine, migrate

LEASE = timedelta(seconds=30)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'aimesh.db'}"
    return request.getfixturevalue("fresh_postgres_url")


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(url, clock):
    engine = make_engine(url)
    migrate(engine)
    yield JobStore(engine, retention=timedelta(hours=1), clock=clock)
    engine.dispose()


def submit(store: JobStore, tenant: str = "acme", items: int = 3, key: str = ""):
    return store.create_job(tenant, kind="embed", capability="embedding", model="m",
                            requests=[f"r{i}".encode() for i in range(items)], idempotency_key=key)


def test_a_job_runs_item_by_item_and_closes_with_the_last(store: JobStore) -> None:
    job, created = submit(store)
    assert created and job.state == QUEUED and job.total == 3 and job.counts == {QUEUED: 3}
    for index in range(3):
        claim = store.claim(job.id, index, "w1", LEASE)
        assert isinstance(claim, Claim) and claim.request == f"r{index}".encode() and claim.tenant == "acme"
        assert store.get_job("acme", job.id).state == RUNNING
        error = ItemError("INVALID_FIELD", "bad", b"") if index == 2 else None
        assert store.finish(job.id, index, "w1", result_key=None if error else f"k{index}", error=error)
    done = store.get_job("acme", job.id)
    assert done.state == SUCCEEDED and done.counts == {SUCCEEDED: 2, FAILED: 1}
    assert done.expire_at == done.ended_at + timedelta(hours=1)
    items = store.list_items("acme", job.id)
    assert [(i.index, i.state, i.attempts) for i in items] == [(0, SUCCEEDED, 1), (1, SUCCEEDED, 1), (2, FAILED, 1)]
    assert items[2].error_reason == "INVALID_FIELD"


def test_every_item_failed_is_a_failed_job(store: JobStore) -> None:
    job, _ = submit(store, items=1)
    store.claim(job.id, 0, "w1", LEASE)
    store.finish(job.id, 0, "w1", error=ItemError("ENGINE_FAILURE", "boom", b""))
    assert store.get_job("acme", job.id).state == FAILED


def test_a_stored_result_is_never_handed_out_again(store: JobStore) -> None:
    job, _ = submit(store, items=1)
    store.claim(job.id, 0, "w1", LEASE)
    assert store.finish(job.id, 0, "w1", result_key="k")
    assert store.claim(job.id, 0, "w2", LEASE) == Refusal(done=True)


def test_a_dead_workers_item_goes_to_another_after_its_lease(store: JobStore, clock: Clock) -> None:
    job, _ = submit(store, items=1)
    assert isinstance(store.claim(job.id, 0, "w1", LEASE), Claim)
    refused = store.claim(job.id, 0, "w2", LEASE)
    assert isinstance(refused, Refusal) and not refused.done and refused.retry_at == clock.now + LEASE
    clock.advance(seconds=31)
    second = store.claim(job.id, 0, "w2", LEASE)
    assert isinstance(second, Claim) and second.attempt == 2
    # The first worker's late result is not the item's.
    assert not store.finish(job.id, 0, "w1", result_key="late")
    assert not store.renew(job.id, 0, "w1", LEASE)
    assert store.finish(job.id, 0, "w2", result_key="k")
    assert store.list_items("acme", job.id)[0].result_key == "k"


def test_cancel_stops_unfinished_items_and_keeps_results(store: JobStore) -> None:
    job, _ = submit(store, items=3)
    store.claim(job.id, 0, "w1", LEASE)
    store.finish(job.id, 0, "w1", result_key="k0")
    store.claim(job.id, 1, "w1", LEASE)
    cancelled = store.cancel_job("acme", job.id)
    assert cancelled.state == CANCELLED and cancelled.counts == {SUCCEEDED: 1, CANCELLED: 2}
    assert not store.renew(job.id, 1, "w1", LEASE)  # the running worker learns it must stop
    assert not store.finish(job.id, 1, "w1", result_key="k1")
    assert store.claim(job.id, 2, "w1", LEASE) == Refusal(done=True)
    assert store.cancel_job("acme", job.id).state == CANCELLED  # again: no change


def test_idempotency_key_is_per_tenant(store: JobStore) -> None:
    first, created = submit(store, key="nightly-1")
    again, created_again = submit(store, key="nightly-1")
    other, created_other = submit(store, tenant="globex", key="nightly-1")
    assert created and not created_again and again.id == first.id
    assert created_other and other.id != first.id
    assert submit(store)[0].id != submit(store)[0].id  # no key: every submit is a job


def test_a_tenant_sees_and_cancels_only_its_own_jobs(store: JobStore) -> None:
    job, _ = submit(store, tenant="acme")
    with pytest.raises(JobNotFound):
        store.get_job("globex", job.id)
    with pytest.raises(JobNotFound):
        store.cancel_job("globex", job.id)
    with pytest.raises(JobNotFound):
        store.list_items("globex", job.id)
    assert store.list_jobs("globex") == []
    assert store.get_job("acme", job.id).state == QUEUED


def test_list_filters_by_state_and_pages_newest_first(store: JobStore, clock: Clock) -> None:
    ids = []
    for _ in range(5):
        ids.append(submit(store, items=1)[0].id)
        clock.advance(seconds=1)
    store.cancel_job("acme", ids[1])
    assert [j.id for j in store.list_jobs("acme", limit=2)] == [ids[4], ids[3]]
    assert [j.id for j in store.list_jobs("acme", limit=2, offset=2)] == [ids[2], ids[1]]
    assert [j.id for j in store.list_jobs("acme", state=CANCELLED)] == [ids[1]]


def test_unfinished_items_are_found_for_a_restart(store: JobStore) -> None:
    a, _ = submit(store, items=2)
    b, _ = submit(store, items=1)
    store.claim(a.id, 0, "w1", LEASE)
    store.finish(a.id, 0, "w1", result_key="k")
    store.claim(a.id, 1, "w1", LEASE)  # running when the mesh stopped
    assert set(store.unfinished()) == {(a.id, 1, "m"), (b.id, 0, "m")}


def test_results_expire_after_the_retention(store: JobStore, clock: Clock, tmp_path) -> None:
    results = FileResultStore(tmp_path / "results")
    job, _ = submit(store, items=1)
    store.claim(job.id, 0, "w1", LEASE)
    key = result_key("acme", job.id, 0)
    results.put(key, b"answer")
    store.finish(job.id, 0, "w1", result_key=key)
    assert store.expired() == []
    clock.advance(hours=1, seconds=1)
    with pytest.raises(JobNotFound):
        store.get_job("acme", job.id)
    assert store.expired() == [("acme", job.id)]
    results.delete_prefix(job_prefix("acme", job.id))
    store.delete_jobs([job.id])
    assert store.expired() == [] and not (tmp_path / "results" / "acme" / job.id).exists()


def test_result_keys_stay_inside_the_store(tmp_path) -> None:
    results = FileResultStore(tmp_path)
    assert result_key("../evil", "j", 0) == "..%2Fevil/j/0.pb"
    with pytest.raises(ValueError):
        results.put("../outside.pb", b"x")


def workflow_job(store: JobStore, steps: int = 3):
    return store.create_job("acme", kind=WORKFLOW, capability=WORKFLOW, model="",
                            requests=[f"s{i}".encode() for i in range(steps)])[0]


def test_workflow_steps_run_in_order_and_all_must_succeed(store: JobStore) -> None:
    job = workflow_job(store)
    assert store.claim(job.id, 1, "w1", LEASE) == Refusal(done=True)  # step 0 has not succeeded
    assert store.next_step(job.id, 0) is None
    store.claim(job.id, 0, "w1", LEASE)
    store.finish(job.id, 0, "w1", result_key="k0")
    assert store.next_step(job.id, 0) == b"s1"
    second = store.claim(job.id, 1, "w1", LEASE)
    assert isinstance(second, Claim) and second.previous_request == b"s0"
    assert store.next_step(job.id, 0) is None  # step 1 is no longer waiting
    store.finish(job.id, 1, "w1", result_key="k1")
    store.claim(job.id, 2, "w1", LEASE)
    store.finish(job.id, 2, "w1", result_key="k2")
    assert store.get_job("acme", job.id).state == SUCCEEDED


def test_a_failed_step_ends_its_workflow(store: JobStore) -> None:
    job = workflow_job(store)
    store.claim(job.id, 0, "w1", LEASE)
    store.finish(job.id, 0, "w1", result_key="k0")
    store.claim(job.id, 1, "w1", LEASE)
    store.finish(job.id, 1, "w1", error=ItemError("ENGINE_FAILURE", "boom", b""))
    done = store.get_job("acme", job.id)
    assert done.state == FAILED and done.counts == {SUCCEEDED: 1, FAILED: 1, CANCELLED: 1}
    assert store.next_step(job.id, 1) is None
