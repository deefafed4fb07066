"""JobService over a real in-process grpc.aio server (the runner and its interceptor) on
a real SQLite store, through the SDK's jobs client. No workers run here: jobs stay
queued, which is what these tests look at (paging, scopes, tenants, errors).

There is no Envoy, so each channel sets the identity headers the front door's
jwt_authn would set from a verified token.
"""

from __future__ import annotations

import aimesh
import grpc
import pytest
from aimesh.client.jobs import AsyncJobsClient
from aimesh.client.transport import AsyncTransport
from aimesh.embedding.v1.embedding_pb2 import EmbedRequest
from aimesh.jobs.v1 import jobs_pb2 as pb
from aimesh.text.v1.text_generation_pb2 import GenerateRequest
from aimesh_servers.jobs.queue import MemoryQueue
from aimesh_servers.jobs.results import FileResultStore
from aimesh_servers.jobs.servicer import JobCapability, JobServicer
from aimesh_servers.jobs.settings import JobSettings
from aimesh_servers.jobs.store import JobStore
from aimesh_servers.tenancy.db import make_engine, migrate

from tests.identity import AddHeaders, identity
from tests.servers import in_process_server

EMBED = "all-minilm-l6-v2"


def embeds(count: int) -> list[EmbedRequest]:
    return [EmbedRequest(model=EMBED, texts=[f"text {i}"]) for i in range(count)]


@pytest.fixture(scope="module")
async def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    engine = make_engine(f"sqlite:///{root / 'aimesh.db'}")
    migrate(engine)
    store = JobStore(engine)
    queue = MemoryQueue()
    settings = JobSettings(max_items=10)
    capability = JobCapability(JobServicer(store, FileResultStore(root / "results"), queue, settings, enforce=True,
                                           models=[EMBED, "smollm2-135m"]))
    async with in_process_server([capability]) as (server, _):
        target = f"127.0.0.1:{server.port}"
        channels = {name: grpc.aio.insecure_channel(target, interceptors=[AddHeaders(headers)])
                    for name, headers in (("acme", identity("acme", "embedding")),
                                          ("globex", identity("globex", "embedding text")),
                                          ("none", []))}
        yield {name: AsyncJobsClient(AsyncTransport(channel, None, 30)) for name, channel in channels.items()}, queue
        for channel in channels.values():
            await channel.close()
    engine.dispose()


async def test_a_batch_is_queued_item_by_item_and_paged(served):
    clients, queue = served
    acme = clients["acme"]
    job = await acme.submit(embeds(7), display_name="seven")
    assert job.state == pb.JOB_STATE_QUEUED and job.progress.total == 7 and job.tenant == "acme"
    assert job.capability == "embedding" and job.model == EMBED and job.display_name == "seven"
    handed = [await queue.get() for _ in range(7)]
    assert [(d.job_id, d.index, d.model) for d in handed] == [(job.name[5:], i, EMBED) for i in range(7)]
    first = await acme.results(job, page_size=3)
    assert [r.index for r in first.results] == [0, 1, 2] and first.next_page_token
    assert all(r.state == pb.ITEM_STATE_QUEUED for r in first.results)
    assert [r.index async for r in acme.iter_results(job, page_size=3)] == list(range(7))


async def test_list_pages_and_filters(served):
    clients, _ = served
    globex = clients["globex"]
    made = [await globex.submit(embeds(1)) for _ in range(3)]
    await globex.cancel(made[0])
    page = await globex.list(page_size=2)
    assert len(page.jobs) == 2 and page.next_page_token
    rest = await globex.list(page_size=2, page_token=page.next_page_token)
    assert {j.name for j in [*page.jobs, *rest.jobs]} == {j.name for j in made}
    assert [j.name for j in (await globex.list(state="cancelled")).jobs] == [made[0].name]


async def test_another_tenants_job_is_not_found_with_the_reason(served):
    clients, _ = served
    job = await clients["acme"].submit(embeds(1))
    for call in (clients["globex"].get, clients["globex"].cancel, clients["globex"].results):
        with pytest.raises(aimesh.NotFoundError) as missing:
            await call(job)
        assert missing.value.reason == "JOB_NOT_FOUND"
    assert (await clients["acme"].get(job)).state == pb.JOB_STATE_QUEUED


async def test_bad_submits_are_refused_before_anything_is_stored(served):
    clients, _ = served
    acme = clients["acme"]
    with pytest.raises(aimesh.PermissionDeniedError):  # no text scope
        await acme.submit([GenerateRequest(model="smollm2-135m")])
    with pytest.raises(aimesh.InvalidArgumentError) as too_many:
        await acme.submit(embeds(11))
    assert too_many.value.metadata["field"] == "requests"
    with pytest.raises(aimesh.InvalidArgumentError) as models:
        await acme.submit([*embeds(1), EmbedRequest(model="other", texts=["x"])])
    assert models.value.metadata["field"] == "requests[1].embed.model"
    with pytest.raises(aimesh.NotFoundError) as unknown:
        await acme.submit([EmbedRequest(model="no-such-model", texts=["x"])])
    assert unknown.value.reason == "MODEL_NOT_FOUND" and EMBED in unknown.value.metadata["available"]
    with pytest.raises(aimesh.InvalidArgumentError):
        await acme.submit_workflow([EmbedRequest(model=EMBED), GenerateRequest(model="smollm2-135m")])
    with pytest.raises(aimesh.InvalidArgumentError):
        await acme.get("jobs/a/b")
    with pytest.raises(aimesh.UnauthenticatedError):  # not through the front door
        await clients["none"].list()


async def test_the_same_idempotency_key_returns_the_same_job(served):
    clients, _ = served
    first = await clients["globex"].submit(embeds(2), idempotency_key="k1")
    again = await clients["globex"].submit(embeds(2), idempotency_key="k1")
    other = await clients["acme"].submit(embeds(2), idempotency_key="k1")
    assert again.name == first.name and other.name != first.name
