"""Asynchronous and batch jobs and workflows: `client.jobs.submit([...])`,
`.submit_workflow([...])`, `.get`, `.list`, `.cancel`, `.watch`, `.results`, `.write_jsonl`.

A job is one request of any capability, or a batch of many of the same capability and
model, run by the mesh while the caller is away. Give the capabilities' own request
messages (`aimesh.text.v1.text_generation_pb2.GenerateRequest(model=..., ...)`,
`EmbedRequest`, ...) or `JobRequest`s:

    job = client.jobs.submit([GenerateRequest(model="smollm2-135m", messages=[...]), ...],
                             idempotency_key="nightly-2026-03-01")
    job = client.jobs.wait(job)                      # until it has finished
    for result in client.jobs.iter_results(job):     # per item: response or error
        print(result.index, result.response.generate.text)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import IO

from google.protobuf import json_format
from google.protobuf.message import Message

from ..jobs.v1 import jobs_pb2 as pb
from ..jobs.v1 import jobs_pb2_grpc as pb_grpc
from .transport import AsyncTransport, Transport

# Request message type -> its JobRequest case ("generate", "embed", ...).
_CASES = {field.message_type.full_name: field.name
          for field in pb.JobRequest.DESCRIPTOR.oneofs_by_name["request"].fields}
FINISHED = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)

JobRef = str | pb.Job  # "jobs/{id}" or the Job


def job_request(request: Message) -> pb.JobRequest:
    """A capability's request message (or a JobRequest) as a JobRequest."""
    if isinstance(request, pb.JobRequest):
        return request
    case = _CASES.get(request.DESCRIPTOR.full_name)
    if case is None:
        raise TypeError(f"{request.DESCRIPTOR.full_name} cannot be a job; give one of {', '.join(sorted(_CASES))}")
    out = pb.JobRequest()
    getattr(out, case).CopyFrom(request)
    return out


def _submit(requests: Iterable[Message], idempotency_key: str, display_name: str) -> pb.SubmitJobRequest:
    return pb.SubmitJobRequest(requests=[job_request(r) for r in requests], idempotency_key=idempotency_key,
                               display_name=display_name)


def _workflow(steps: Iterable[Message], idempotency_key: str, display_name: str) -> pb.SubmitJobRequest:
    return pb.SubmitJobRequest(steps=[job_request(s) for s in steps], idempotency_key=idempotency_key,
                               display_name=display_name)


def _name(job: JobRef) -> str:
    return job.name if isinstance(job, pb.Job) else job


def _state(state: str | int) -> int:
    if isinstance(state, int):
        return state
    return pb.JobState.Value(f"JOB_STATE_{state.upper()}") if state else pb.JOB_STATE_UNSPECIFIED


def jsonl_line(result: pb.JobResult) -> str:
    """One result as a JSON line (proto3 JSON names; bytes as base64)."""
    return json_format.MessageToJson(result, indent=None) + "\n"


class JobsClient:
    """Blocking job calls."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._stub = pb_grpc.JobServiceStub(transport.channel)

    def submit(self, requests: Iterable[Message], *, idempotency_key: str = "", display_name: str = "",
               timeout: float | None = None) -> pb.Job:
        """Queues a job of these requests (one: an async call; many: a batch of one kind and
        model). The same idempotency_key again returns the first job."""
        request = _submit(requests, idempotency_key, display_name)
        return self._t.unary(self._stub.SubmitJob, request, timeout=timeout).job

    def submit_workflow(self, steps: Iterable[Message], *, idempotency_key: str = "", display_name: str = "",
                        timeout: float | None = None) -> pb.Job:
        """Queues a workflow: the steps run in order, each step's output filling the next
        step's empty input (e.g. GenerateRequest -> SynthesizeRequest(text="") ->
        RecognizeRequest(audio=b"")); results are per step."""
        request = _workflow(steps, idempotency_key, display_name)
        return self._t.unary(self._stub.SubmitJob, request, timeout=timeout).job

    def get(self, job: JobRef, *, timeout: float | None = None) -> pb.Job:
        return self._t.unary(self._stub.GetJob, pb.GetJobRequest(name=_name(job)), timeout=timeout).job

    def list(self, *, state: str | int = "", page_size: int = 50, page_token: str = "",
             timeout: float | None = None) -> pb.ListJobsResponse:
        """One page of the tenant's jobs, newest first; state: "queued", "running", ..."""
        request = pb.ListJobsRequest(state=_state(state), page_size=page_size, page_token=page_token)
        return self._t.unary(self._stub.ListJobs, request, timeout=timeout)

    def cancel(self, job: JobRef, *, timeout: float | None = None) -> pb.Job:
        return self._t.unary(self._stub.CancelJob, pb.CancelJobRequest(name=_name(job)), timeout=timeout).job

    def watch(self, job: JobRef, *, timeout: float | None = None) -> Iterator[pb.Job]:
        """The job now, then after every change, until it has finished (or the deadline)."""
        for reply in self._t.stream(self._stub.WatchJob, pb.WatchJobRequest(name=_name(job)), timeout=timeout):
            yield reply.job

    def wait(self, job: JobRef, *, timeout: float | None = None) -> pb.Job:
        """The job once it has finished (DeadlineExceededError after `timeout`)."""
        last = None
        for last in self.watch(job, timeout=timeout):
            pass
        assert last is not None
        return last

    def results(self, job: JobRef, *, page_size: int = 100, page_token: str = "",
                timeout: float | None = None) -> pb.ListJobResultsResponse:
        request = pb.ListJobResultsRequest(name=_name(job), page_size=page_size, page_token=page_token)
        return self._t.unary(self._stub.ListJobResults, request, timeout=timeout)

    def iter_results(self, job: JobRef, *, page_size: int = 100, timeout: float | None = None
                     ) -> Iterator[pb.JobResult]:
        """Every item's result in order, page after page."""
        token = ""
        while True:
            page = self.results(job, page_size=page_size, page_token=token, timeout=timeout)
            yield from page.results
            token = page.next_page_token
            if not token:
                return

    def write_jsonl(self, job: JobRef, out: IO[str], *, timeout: float | None = None) -> int:
        """Writes every result as one JSON line; returns how many."""
        count = 0
        for result in self.iter_results(job, timeout=timeout):
            out.write(jsonl_line(result))
            count += 1
        return count


class AsyncJobsClient:
    """Awaitable job calls (same methods as JobsClient)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport
        self._stub = pb_grpc.JobServiceStub(transport.channel)

    async def submit(self, requests: Iterable[Message], *, idempotency_key: str = "", display_name: str = "",
                     timeout: float | None = None) -> pb.Job:
        request = _submit(requests, idempotency_key, display_name)
        return (await self._t.unary(self._stub.SubmitJob, request, timeout=timeout)).job

    async def submit_workflow(self, steps: Iterable[Message], *, idempotency_key: str = "",
                              display_name: str = "", timeout: float | None = None) -> pb.Job:
        request = _workflow(steps, idempotency_key, display_name)
        return (await self._t.unary(self._stub.SubmitJob, request, timeout=timeout)).job

    async def get(self, job: JobRef, *, timeout: float | None = None) -> pb.Job:
        return (await self._t.unary(self._stub.GetJob, pb.GetJobRequest(name=_name(job)), timeout=timeout)).job

    async def list(self, *, state: str | int = "", page_size: int = 50, page_token: str = "",
                   timeout: float | None = None) -> pb.ListJobsResponse:
        request = pb.ListJobsRequest(state=_state(state), page_size=page_size, page_token=page_token)
        return await self._t.unary(self._stub.ListJobs, request, timeout=timeout)

    async def cancel(self, job: JobRef, *, timeout: float | None = None) -> pb.Job:
        reply = await self._t.unary(self._stub.CancelJob, pb.CancelJobRequest(name=_name(job)), timeout=timeout)
        return reply.job

    async def watch(self, job: JobRef, *, timeout: float | None = None) -> AsyncIterator[pb.Job]:
        async for reply in self._t.stream(self._stub.WatchJob, pb.WatchJobRequest(name=_name(job)),
                                          timeout=timeout):
            yield reply.job

    async def wait(self, job: JobRef, *, timeout: float | None = None) -> pb.Job:
        last = None
        async for last in self.watch(job, timeout=timeout):
            pass
        assert last is not None
        return last

    async def results(self, job: JobRef, *, page_size: int = 100, page_token: str = "",
                      timeout: float | None = None) -> pb.ListJobResultsResponse:
        request = pb.ListJobResultsRequest(name=_name(job), page_size=page_size, page_token=page_token)
        return await self._t.unary(self._stub.ListJobResults, request, timeout=timeout)

    async def iter_results(self, job: JobRef, *, page_size: int = 100, timeout: float | None = None
                           ) -> AsyncIterator[pb.JobResult]:
        token = ""
        while True:
            page = await self.results(job, page_size=page_size, page_token=token, timeout=timeout)
            for result in page.results:
                yield result
            token = page.next_page_token
            if not token:
                return

    async def write_jsonl(self, job: JobRef, out: IO[str], *, timeout: float | None = None) -> int:
        count = 0
        async for result in self.iter_results(job, timeout=timeout):
            out.write(jsonl_line(result))
            count += 1
        return count
