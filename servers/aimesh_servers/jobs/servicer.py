"""aimesh.jobs.v1.JobService, served by the control server.

Who is asking comes only from the headers the front door sets after verifying the
token (``x-aimesh-tenant``, ``x-aimesh-scopes``); with tenancy off every caller is the
tenant "local". A submit needs the requests' capability among the token's scopes
(the front door only checks that the token is valid for this route). Store calls run
in worker threads (SQLAlchemy is synchronous).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

import grpc
from aimesh.jobs.v1 import jobs_pb2 as pb
from aimesh.jobs.v1 import jobs_pb2_grpc as pb_grpc
from google.protobuf import timestamp_pb2

from ..runtime.errors import (
    InvalidArgument,
    ModelNotFound,
    PermissionDenied,
    Unauthenticated,
)
from ..tenancy.plans import ADMIN_SCOPE
from . import store as st
from . import workflow
from .kinds import KINDS
from .queue import Delivery, ItemQueue
from .results import ResultStore
from .settings import JobSettings
from .store import WORKFLOW, ItemRecord, JobRecord, JobStore

TENANT_HEADER = "x-aimesh-tenant"
SCOPES_HEADER = "x-aimesh-scopes"
LOCAL_TENANT = "local"  # everyone, when tenancy is off
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name
MAX_KEY_LENGTH = 256
WATCH_POLL_S = 0.25  # WatchJob reads the database (any worker process may change a job)

STATE_TO_PB = {st.QUEUED: pb.JOB_STATE_QUEUED, st.RUNNING: pb.JOB_STATE_RUNNING,
               st.SUCCEEDED: pb.JOB_STATE_SUCCEEDED, st.FAILED: pb.JOB_STATE_FAILED,
               st.CANCELLED: pb.JOB_STATE_CANCELLED}
STATE_FROM_PB = {value: key for key, value in STATE_TO_PB.items()}
ITEM_TO_PB = {st.QUEUED: pb.ITEM_STATE_QUEUED, st.RUNNING: pb.ITEM_STATE_RUNNING,
              st.SUCCEEDED: pb.ITEM_STATE_SUCCEEDED, st.FAILED: pb.ITEM_STATE_FAILED,
              st.CANCELLED: pb.ITEM_STATE_CANCELLED}


@dataclass(frozen=True)
class Caller:
    tenant: str
    scopes: tuple[str, ...] | None  # None: tenancy off, every capability

    def may_use(self, capability: str) -> bool:
        return self.scopes is None or capability in self.scopes or ADMIN_SCOPE in self.scopes


def _timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


def job_message(job: JobRecord) -> pb.Job:
    counts = job.counts
    return pb.Job(
        name=job.name, state=STATE_TO_PB[job.state], capability=job.capability, model=job.model,
        progress=pb.JobProgress(total=job.total, succeeded=counts.get(st.SUCCEEDED, 0),
                                failed=counts.get(st.FAILED, 0), running=counts.get(st.RUNNING, 0),
                                cancelled=counts.get(st.CANCELLED, 0)),
        display_name=job.display_name, idempotency_key=job.idempotency_key or "",
        create_time=_timestamp(job.created_at), start_time=_timestamp(job.started_at),
        end_time=_timestamp(job.ended_at), expire_time=_timestamp(job.expire_at), tenant=job.tenant)


def _page(token: str, field: str = "page_token") -> int:
    if not token:
        return 0
    if not token.isdigit():
        raise InvalidArgument(f"{field} {token!r} is not one this service gave out", field=field)
    return int(token)


def _page_size(size: int, default: int, most: int) -> int:
    if size < 0:
        raise InvalidArgument(f"page_size {size} is negative", field="page_size")
    return min(size or default, most)


def _job_id(name: str) -> str:
    job_id = name.removeprefix("jobs/")
    if not name.startswith("jobs/") or not job_id or "/" in job_id:
        raise InvalidArgument(f"name {name!r} is not a job name (jobs/{{id}})", field="name")
    return job_id


class JobServicer(pb_grpc.JobServiceServicer):
    def __init__(self, store: JobStore, results: ResultStore, queue: ItemQueue,
                 settings: JobSettings, enforce: bool, models: Collection[str] = ()) -> None:
        self.models = frozenset(models)  # the registry's model ids; empty: not checked here
        self.store = store
        self.results = results
        self.queue = queue
        self.settings = settings
        self.enforce = enforce

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        headers = dict(context.invocation_metadata() or ())
        if not self.enforce:
            return Caller(tenant=headers.get(TENANT_HEADER) or LOCAL_TENANT, scopes=None)
        tenant = headers.get(TENANT_HEADER, "")
        if not tenant:
            raise Unauthenticated("no verified tenant: call through the front door with a token")
        return Caller(tenant=tenant, scopes=tuple(headers.get(SCOPES_HEADER, "").split()))

    def _check(self, request: pb.SubmitJobRequest, caller: Caller) -> tuple[str, str, list[bytes]]:
        """(kind, model, serialized requests); InvalidArgument or PermissionDenied."""
        if not request.requests:
            raise InvalidArgument("a job needs at least one request (or steps)", field="requests")
        if len(request.requests) > self.settings.max_items:
            raise InvalidArgument(f"{len(request.requests)} requests; a job takes at most "
                                  f"{self.settings.max_items}", field="requests")
        if len(request.idempotency_key) > MAX_KEY_LENGTH:
            raise InvalidArgument(f"idempotency_key is longer than {MAX_KEY_LENGTH} characters",
                                  field="idempotency_key")
        kind = request.requests[0].WhichOneof("request")
        if kind is None:
            raise InvalidArgument("requests[0] names no request", field="requests[0]")
        model = getattr(request.requests[0], kind).model
        raw = []
        for index, item in enumerate(request.requests):
            case = item.WhichOneof("request")
            if case != kind:
                raise InvalidArgument(f"requests[{index}] is {case or 'empty'}, requests[0] is {kind}: "
                                      "a job's requests are all of one kind", field=f"requests[{index}]")
            inner = getattr(item, case)
            if inner.model != model:
                raise InvalidArgument(f"requests[{index}] names model {inner.model!r}, requests[0] "
                                      f"{model!r}: a job's requests are all for one model",
                                      field=f"requests[{index}].{case}.model")
            raw.append(inner.SerializeToString())
        capability = KINDS[kind].capability
        if not caller.may_use(capability):
            raise PermissionDenied(f"token scope '{' '.join(caller.scopes or ())}' does not include "
                                   f"{capability}", metadata={"tenant": caller.tenant, "scope": capability})
        self._known(model, f"requests[0].{kind}.model")
        return kind, model, raw

    def _known(self, model: str, field: str) -> None:
        """An unknown model is refused at submit, not found out item by item."""
        if model and self.models and model not in self.models:
            raise ModelNotFound(model, sorted(self.models), field=field)

    def _check_workflow(self, request: pb.SubmitJobRequest, caller: Caller) -> list[bytes]:
        """The steps, serialized; InvalidArgument or PermissionDenied."""
        if request.requests:
            raise InvalidArgument("give requests (a job or batch) or steps (a workflow), not both",
                                  field="steps")
        if len(request.steps) > self.settings.max_items:
            raise InvalidArgument(f"{len(request.steps)} steps; a workflow takes at most "
                                  f"{self.settings.max_items}", field="steps")
        for index, kind in enumerate(workflow.check(request.steps)):
            self._known(getattr(request.steps[index], kind).model, f"steps[{index}].{kind}.model")
            capability = KINDS[kind].capability
            if not caller.may_use(capability):
                raise PermissionDenied(f"token scope '{' '.join(caller.scopes or ())}' does not include "
                                       f"{capability} (steps[{index}])",
                                       metadata={"tenant": caller.tenant, "scope": capability})
        return [step.SerializeToString() for step in request.steps]

    async def SubmitJob(self, request: pb.SubmitJobRequest, context) -> pb.SubmitJobResponse:
        caller = self._caller(context)
        if request.steps:
            steps = self._check_workflow(request, caller)
            first = request.steps[0]
            kind, model, raw = WORKFLOW, "", steps
            first_model = getattr(first, first.WhichOneof("request")).model
        else:
            kind, model, raw = self._check(request, caller)
            first_model = model
        job, created = await asyncio.to_thread(
            self.store.create_job, caller.tenant, kind=kind,
            capability=WORKFLOW if kind == WORKFLOW else KINDS[kind].capability, model=model,
            requests=raw, idempotency_key=request.idempotency_key, display_name=request.display_name)
        if created:  # a workflow's later steps are enqueued as the ones before succeed
            count = 1 if kind == WORKFLOW else job.total
            await self.queue.put(Delivery(job.id, index, first_model) for index in range(count))
        return pb.SubmitJobResponse(job=job_message(job))

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.GetJobResponse:
        caller, job_id = self._caller(context), _job_id(request.name)
        job = await asyncio.to_thread(lambda: self.store.get_job(caller.tenant, job_id))
        return pb.GetJobResponse(job=job_message(job))

    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        caller = self._caller(context)
        if request.state not in STATE_FROM_PB and request.state != pb.JOB_STATE_UNSPECIFIED:
            raise InvalidArgument(f"unknown state {request.state}", field="state")
        size, offset = _page_size(request.page_size, 50, 500), _page(request.page_token)
        found = await asyncio.to_thread(self.store.list_jobs, caller.tenant,
                                        state=STATE_FROM_PB.get(request.state), limit=size + 1, offset=offset)
        return pb.ListJobsResponse(jobs=[job_message(job) for job in found[:size]],
                                   next_page_token=str(offset + size) if len(found) > size else "")

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.CancelJobResponse:
        caller, job_id = self._caller(context), _job_id(request.name)
        job = await asyncio.to_thread(lambda: self.store.cancel_job(caller.tenant, job_id))
        return pb.CancelJobResponse(job=job_message(job))

    async def WatchJob(self, request: pb.WatchJobRequest, context):  # type: ignore[no-untyped-def]
        caller, job_id = self._caller(context), _job_id(request.name)
        last = None
        while True:
            job = await asyncio.to_thread(lambda: self.store.get_job(caller.tenant, job_id))
            message = job_message(job)
            if message != last:
                yield pb.WatchJobResponse(job=message)
                last = message
            if job.finished:
                return
            await asyncio.sleep(WATCH_POLL_S)

    async def ListJobResults(self, request: pb.ListJobResultsRequest, context) -> pb.ListJobResultsResponse:
        caller, job_id = self._caller(context), _job_id(request.name)
        size, start = _page_size(request.page_size, 100, 1000), _page(request.page_token)
        items = await asyncio.to_thread(lambda: self.store.list_items(caller.tenant, job_id, start=start,
                                                                         limit=size + 1))
        results = await asyncio.to_thread(lambda: [self._result(item) for item in items[:size]])
        more = len(items) > size
        return pb.ListJobResultsResponse(results=results, next_page_token=str(start + size) if more else "")

    def _result(self, item: ItemRecord) -> pb.JobResult:
        out = pb.JobResult(index=item.index, state=ITEM_TO_PB[item.state], attempts=item.attempts)
        if item.state == st.SUCCEEDED and item.result_key:
            out.response.ParseFromString(self.results.get(item.result_key))
        if item.error_status:
            out.error.ParseFromString(item.error_status)
        return out


class JobCapability:
    """JobService as the control server hosts it."""

    models: Sequence = ()
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, servicer: JobServicer) -> None:
        self.servicer = servicer

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_JobServiceServicer_to_server(self.servicer, server)

    def load(self) -> None:
        """Nothing to load."""


