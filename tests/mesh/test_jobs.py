"""Jobs end to end: `aimesh up` with real Envoy, real model servers, JobService in the
control server and workers calling the front door; a real redis-server and PostgreSQL
where a test says so. Every wait polls for a state, with a generous deadline."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import aimesh
import httpx
import pytest
from aimesh.embedding.v1.embedding_pb2 import EmbedRequest
from aimesh.jobs.v1 import jobs_pb2 as pb
from aimesh.speech.v1.speech_to_text_pb2 import RecognizeRequest
from aimesh.speech.v1.text_to_speech_pb2 import SynthesizeRequest
from aimesh.text.v1.text_generation_pb2 import ROLE_USER, ChatMessage, GenerateRequest

from tests.infra import redis_server
from tests.mesh.conftest import Mesh
from tests.polling import poll

pytestmark = pytest.mark.mesh

TEXT = "smollm2-135m"
EMBED = "all-minilm-l6-v2"
LEASE_S = "3"  # a killed worker's items go to another after this


def texts(count: int, max_tokens: int = 4, tag: str = "") -> list[GenerateRequest]:
    return [GenerateRequest(model=TEXT, messages=[ChatMessage(role=ROLE_USER, content=f"{tag}Count to {i}.")],
                            max_tokens=max_tokens, temperature=0) for i in range(count)]


@contextlib.contextmanager
def running_mesh(state_dir: Path, *args: str, tenancy: bool = True) -> Iterator[Mesh]:
    saved = os.environ.get("AIMESH_JOB_LEASE_S")
    os.environ["AIMESH_JOB_LEASE_S"] = LEASE_S
    try:
        mesh = Mesh(state_dir, extra_args=args, tenancy=tenancy)
    finally:
        if saved is None:
            del os.environ["AIMESH_JOB_LEASE_S"]
        else:
            os.environ["AIMESH_JOB_LEASE_S"] = saved
    try:
        mesh.wait_ready()
        yield mesh
    finally:
        mesh.stop()


def all_results(client: aimesh.Client, job: pb.Job) -> list[pb.JobResult]:
    return list(client.jobs.iter_results(job, page_size=20, timeout=30))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """Tenancy on, jobs in the control process (no Redis), SQLite."""
    with running_mesh(tmp_path_factory.mktemp("jobs"), "--only", "text", "--only", "embedding") as running:
        yield running


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> Iterator[aimesh.Client]:
    with aimesh.Client(mesh.front, token=mesh.token, timeout=30, max_attempts=1) as c:
        yield c


@pytest.mark.timeout(1200)  # a loaded 2-core box answered 4-token calls in up to 30 s
def test_a_batch_of_50_text_requests_completes_with_50_results(client: aimesh.Client, mesh: Mesh) -> None:
    job = client.jobs.submit(texts(50, max_tokens=2), display_name="fifty")
    assert job.name.startswith("jobs/") and job.progress.total == 50 and job.capability == "text"
    states = [j.state for j in client.jobs.watch(job, timeout=600)]
    assert states[-1] == pb.JOB_STATE_SUCCEEDED, states
    done = client.jobs.get(job)
    assert (done.progress.succeeded, done.progress.failed) == (50, 0)
    assert done.expire_time.ToDatetime() > done.end_time.ToDatetime()
    results = all_results(client, job)
    assert [r.index for r in results] == list(range(50))
    assert all(r.state == pb.ITEM_STATE_SUCCEEDED and r.response.generate.text for r in results)
    assert {r.response.generate.served_by.model for r in results} == {TEXT}
    # The same results as JSON lines, and over HTTP/JSON through the transcoder.
    out = io.StringIO()
    assert client.jobs.write_jsonl(job, out) == 50
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[7]["response"]["generate"]["text"] == results[7].response.generate.text
    auth = {"authorization": f"Bearer {mesh.token}"}
    reply = httpx.get(f"http://{mesh.front}/v1/{job.name}", headers=auth, timeout=30)
    assert reply.status_code == 200 and reply.json()["job"]["state"] == "JOB_STATE_SUCCEEDED", reply.text


def test_submit_over_http_and_resubmit_with_the_same_key(client: aimesh.Client, mesh: Mesh) -> None:
    auth = {"authorization": f"Bearer {mesh.token}"}
    body = {"requests": [{"embed": {"model": EMBED, "texts": ["a man is eating food"]}}],
            "idempotency_key": "embed-once"}
    first = httpx.post(f"http://{mesh.front}/v1/jobs", json=body, headers=auth, timeout=30)
    assert first.status_code == 200, first.text
    again = client.jobs.submit([EmbedRequest(model=EMBED, texts=["a man is eating food"])],
                               idempotency_key="embed-once")
    assert again.name == first.json()["job"]["name"]
    # WatchJob over HTTP is a stream of Server-Sent Events, the last one the finished job.
    events = []
    with httpx.stream("GET", f"http://{mesh.front}/v1/{again.name}:watch", headers=auth, timeout=120) as watch:
        for line in watch.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:])["job"]["state"])
    assert events[-1] == "JOB_STATE_SUCCEEDED", events
    cancel = httpx.post(f"http://{mesh.front}/v1/{again.name}:cancel", json={}, headers=auth, timeout=30)
    assert cancel.status_code == 200 and cancel.json()["job"]["state"] == "JOB_STATE_SUCCEEDED", cancel.text
    results = httpx.get(f"http://{mesh.front}/v1/{again.name}/results", params={"page_size": 5},
                        headers=auth, timeout=30)
    assert results.status_code == 200 and len(results.json()["results"][0]["response"]["embed"]["embeddings"]) == 1
    listed = httpx.get(f"http://{mesh.front}/v1/jobs", params={"state": "JOB_STATE_SUCCEEDED"},
                       headers=auth, timeout=30)
    assert listed.status_code == 200 and again.name in [j["name"] for j in listed.json()["jobs"]], listed.text
    missing = httpx.get(f"http://{mesh.front}/v1/jobs/0000", headers=auth, timeout=30)
    assert missing.status_code == 404 and "JOB_NOT_FOUND" in missing.text, missing.text
    done = client.jobs.get(again)
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.progress.total == 1
    [result] = all_results(client, done)
    assert len(result.response.embed.embeddings[0].values) == 384 and result.attempts == 1


def cancelled_text_calls(admin: aimesh.Client) -> int:
    return sum(r.capability == "text" and r.status == "CANCELLED"
               for r in admin.usage.iter_records(tenant="local", timeout=30))


@pytest.mark.timeout(900)
def test_cancel_stops_a_running_job_and_its_call(client: aimesh.Client, mesh: Mesh) -> None:
    with aimesh.Client(mesh.front, token=mesh.admin_token, timeout=30, max_attempts=1) as admin:
        before = cancelled_text_calls(admin)
        job = client.jobs.submit(texts(40, max_tokens=256, tag="Write a long story. "))
        poll(lambda: client.jobs.get(job).progress.running >= 1, "an item to start", 300)
        cancelled = client.jobs.cancel(job)
        assert cancelled.state == pb.JOB_STATE_CANCELLED
        assert cancelled.progress.cancelled > 0 and cancelled.progress.running == 0
        assert client.jobs.cancel(job).state == pb.JOB_STATE_CANCELLED  # again: unchanged
        # The workers move on (a later job runs) and nothing of the cancelled one ran since.
        later = client.jobs.submit([EmbedRequest(model=EMBED, texts=["after the cancel"])])
        assert client.jobs.wait(later, timeout=300).state == pb.JOB_STATE_SUCCEEDED
        results = all_results(client, job)
        assert sum(r.state == pb.ITEM_STATE_SUCCEEDED for r in results) == cancelled.progress.succeeded
        assert not any(r.state in (pb.ITEM_STATE_RUNNING, pb.ITEM_STATE_QUEUED) for r in results)
        assert client.jobs.get(job).progress == cancelled.progress
        # The call in flight was cancelled too: the text server recorded it so.
        poll(lambda: cancelled_text_calls(admin) > before, "a cancelled text call in the usage records", 120)


def test_a_tenant_sees_and_cancels_only_its_own_jobs(client: aimesh.Client, mesh: Mesh) -> None:
    job = client.jobs.submit([EmbedRequest(model=EMBED, texts=["mine"])])
    with aimesh.Client(mesh.front, token=mesh.admin_token, timeout=30, max_attempts=1) as admin:
        admin.tenants.create("globex")
        token = admin.tenants.issue_token("globex", ["embedding"]).token
    with aimesh.Client(mesh.front, token=token, timeout=30, max_attempts=1) as other:
        def refused() -> bool:
            try:
                other.jobs.get(job)
            except aimesh.NotFoundError as exc:
                return exc.reason == "JOB_NOT_FOUND"
            except aimesh.PermissionDeniedError:  # the front door does not know globex yet
                return False
            raise AssertionError("another tenant read the job")

        poll(refused, "globex's Get to be NOT_FOUND", 30)
        with pytest.raises(aimesh.NotFoundError):
            other.jobs.cancel(job)
        assert list(other.jobs.list().jobs) == []
        with pytest.raises(aimesh.PermissionDeniedError):  # its token has no text scope
            other.jobs.submit(texts(1))
    assert client.jobs.wait(job, timeout=120).state == pb.JOB_STATE_SUCCEEDED
    assert job.name in [j.name for j in client.jobs.list(state="succeeded", page_size=500).jobs]


def test_bad_jobs_are_refused_with_the_field(client: aimesh.Client) -> None:
    with pytest.raises(aimesh.InvalidArgumentError) as empty:
        client.jobs.submit([])
    assert empty.value.metadata.get("field") == "requests"
    with pytest.raises(aimesh.InvalidArgumentError) as mixed:
        client.jobs.submit([*texts(1), EmbedRequest(model=EMBED, texts=["x"])])
    assert mixed.value.metadata.get("field") == "requests[1]"
    with pytest.raises(aimesh.InvalidArgumentError):
        client.jobs.get("not-a-job")
    with pytest.raises(aimesh.InvalidArgumentError):
        client.jobs.list(page_token="garbage")
    with pytest.raises(aimesh.NotFoundError):
        client.jobs.get("jobs/0000")


@pytest.mark.timeout(1200)
def test_a_killed_worker_leaves_its_items_to_another(tmp_path: Path, postgres_server) -> None:
    """Redis Streams queue, two `aimesh worker` processes, PostgreSQL: SIGKILL one
    mid-batch; the batch completes with every item once."""
    database = postgres_server.create_database("jobs_kill")
    with redis_server() as redis_url, running_mesh(
            tmp_path / "state", "--only", "text", "--redis", redis_url, "--database", database,
            "--job-workers", "2", tenancy=False) as mesh, \
            aimesh.Client(mesh.front, timeout=30, max_attempts=1) as client:
        job = client.jobs.submit(texts(12, max_tokens=8, tag="Kill. "))
        poll(lambda: client.jobs.get(job).progress.succeeded >= 2, "two items done", 300)
        pid = int((mesh.state_dir / "job-worker-0.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        mesh.wait_line(r"job worker 0: exited with -9", 60)
        done = client.jobs.wait(job, timeout=600)
        assert done.state == pb.JOB_STATE_SUCCEEDED and done.progress.succeeded == 12, done
        results = all_results(client, job)
        assert sorted(r.index for r in results) == list(range(12))
        assert all(r.state == pb.ITEM_STATE_SUCCEEDED and r.response.generate.text for r in results)


@pytest.mark.timeout(1200)
def test_a_restarted_mesh_resumes_its_batch(tmp_path: Path) -> None:
    """SQLite in the state dir, in-process workers: stop the whole mesh mid-batch, start it
    again, and the batch finishes from the database."""
    state = tmp_path / "state"
    with running_mesh(state, "--only", "text") as mesh, \
            aimesh.Client(mesh.front, token=mesh.token, timeout=30, max_attempts=1) as client:
        job = client.jobs.submit(texts(12, max_tokens=8, tag="Restart. "))
        poll(lambda: client.jobs.get(job).progress.succeeded >= 2, "two items done", 300)
    with running_mesh(state, "--only", "text") as mesh, \
            aimesh.Client(mesh.front, token=mesh.token, timeout=30, max_attempts=1) as client:
        before = client.jobs.get(job)
        assert before.progress.succeeded < 12, "the batch finished before the restart: nothing resumed"
        done = client.jobs.wait(job, timeout=600)
        assert done.state == pb.JOB_STATE_SUCCEEDED and done.progress.succeeded == 12, done
        assert sorted(r.index for r in all_results(client, job)) == list(range(12))


def words(text: str) -> set[str]:
    return {w.strip(".,!?;:'\"").lower() for w in text.split() if len(w.strip(".,!?;:'\"")) >= 4}


@pytest.mark.timeout(1200)
def test_a_text_speech_text_workflow_returns_words_from_the_original(tmp_path: Path) -> None:
    """Each step is a call through the front door with a token for its own capability."""
    with running_mesh(tmp_path / "state", "--only", "text", "--only", "tts", "--only", "stt") as mesh, \
            aimesh.Client(mesh.front, token=mesh.token, timeout=30, max_attempts=1) as client:
        with pytest.raises(aimesh.InvalidArgumentError):  # checked before anything runs
            client.jobs.submit_workflow([*texts(1), RecognizeRequest(model="whisper-base")])
        job = client.jobs.submit_workflow([
            GenerateRequest(model=TEXT, max_tokens=24, temperature=0, messages=[ChatMessage(
                role=ROLE_USER, content="Repeat this sentence exactly: The weather is sunny and warm today.")]),
            SynthesizeRequest(model="piper-joe-medium"),
            RecognizeRequest(model="whisper-base"),
        ])
        assert job.capability == "workflow" and job.progress.total == 3
        done = client.jobs.wait(job, timeout=900)
        results = all_results(client, job)
        assert done.state == pb.JOB_STATE_SUCCEEDED, [(r.index, r.state, r.error.message) for r in results]
        said = results[0].response.generate.text
        audio = b"".join(p.audio_chunk for p in results[1].response.synthesize.responses)
        heard = results[2].response.recognize.text
        assert audio.startswith(b"RIFF") and words(said) & words(heard), (said, heard)
