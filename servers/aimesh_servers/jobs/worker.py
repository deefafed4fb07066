"""Runs job items: each is one call through the mesh's front door, like any tenant's
call, so fallback chains, limits and usage apply to it.

With tenancy on, a worker calls with a short-lived token it mints for the job's tenant
with the mesh's own issuer key, its scope only the item's capability. A batch keeps at
most `limit` items of a model in flight (JobSettings.batch_share of the model's slots).
While a call runs the worker renews its lease; when the lease is lost (the job was
cancelled) it cancels the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from datetime import timedelta

import grpc
from aimesh.jobs.v1 import jobs_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from ..mesh.access import MeshAccess
from ..registry.schema import Registry
from ..tenancy import keys
from ..tenancy.store import TenantStore
from . import workflow
from .kinds import KINDS, Kind, job_response
from .queue import Delivery, ItemQueue
from .results import ResultStore, result_key
from .settings import JobSettings
from .store import WORKFLOW, Claim, ItemError, JobStore, Refusal

log = logging.getLogger(__name__)

# Answers after which the same call may succeed later: the item is tried again.
TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
TOKEN_TTL = timedelta(minutes=15)
MAX_BACKOFF_S = 30.0


def worker_id(suffix: str = "") -> str:
    return f"{socket.gethostname()}-{os.getpid()}{suffix}"


def model_limits(registry: Registry, share: float, workers: int = 1) -> dict[str, int]:
    """Items of each model one worker (of `workers`) keeps in flight."""
    out = {}
    for model in registry.models:
        primary = model.pools[0]
        slots = primary.max_concurrency * max(primary.replicas, 1)
        out[model.id] = max(1, int(share * slots) // max(workers, 1))
    return out


class TokenMinter:
    """Tokens for a tenant and one capability, signed with the mesh's newest key, reused
    until half their life is gone."""

    def __init__(self, tenants: TenantStore) -> None:
        self.tenants = tenants
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}

    def __call__(self, tenant: str, capability: str) -> str:
        now = time.monotonic()
        cached = self._cache.get((tenant, capability))
        if cached and cached[1] > now:
            return cached[0]
        key = max((k for k in self.tenants.signing_keys() if k.active), key=lambda k: k.created_at)
        token, _ = keys.issue_token(key, tenant, [capability], TOKEN_TTL)
        self._cache[(tenant, capability)] = (token, now + TOKEN_TTL.total_seconds() / 2)
        return token


def error_of(exc: grpc.aio.AioRpcError) -> ItemError:
    """The call's google.rpc.Status (with its ErrorInfo when the mesh sent one)."""
    status = status_pb2.Status(code=exc.code().value[0], message=exc.details() or "")
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
    reason = exc.code().name
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason = info.reason
    return ItemError(reason=reason, message=status.message, status=status.SerializeToString())


class JobRunner:
    def __init__(self, store: JobStore, results: ResultStore, queue: ItemQueue, front: str,
                 settings: JobSettings, limits: Mapping[str, int],
                 token_for: Callable[[str, str], str] | None, name: str | None = None,
                 front_cert: str | None = None) -> None:
        self.store = store
        self.results = results
        self.queue = queue
        self.settings = settings
        self.token_for = token_for
        self.name = name or worker_id()
        self.lease = timedelta(seconds=settings.lease_s)
        self._limits = dict(limits)
        self._slots: dict[str, asyncio.Semaphore] = {}
        # front_cert: the front door serves TLS with this certificate (aimesh up --tls-cert).
        self._channel = MeshAccess(front_cert=front_cert).front_channel(front, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024)])
        self._tasks: set[asyncio.Task[None]] = set()

    def _slot(self, model: str) -> asyncio.Semaphore:
        if model not in self._slots:
            self._slots[model] = asyncio.Semaphore(self._limits.get(model, 1))
        return self._slots[model]

    async def run(self) -> None:
        """Takes items from the queue for ever (cancel the task to stop)."""
        try:
            while True:
                delivery = await self.queue.get()
                slot = self._slot(delivery.model)
                await slot.acquire()
                task = asyncio.create_task(self._item(delivery, slot))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._channel.close()

    async def _item(self, delivery: Delivery, slot: asyncio.Semaphore) -> None:
        try:
            claim = await asyncio.to_thread(self.store.claim, delivery.job_id, delivery.index, self.name,
                                            self.lease)
            if isinstance(claim, Refusal):
                if claim.done:
                    # A workflow step that ended before (its worker died before enqueuing
                    # the next one): enqueue that now.
                    await self._follow(delivery.job_id, delivery.index)
                    await self.queue.ack(delivery)
                else:  # another worker holds it: look again when its lease ends
                    await self.queue.retry_later(delivery, self.settings.lease_s)
                return
            await self._run(claim)
            if claim.kind == WORKFLOW:
                await self._follow(claim.job_id, claim.index)
            await self.queue.ack(delivery)
        except asyncio.CancelledError:
            raise
        except Exception:  # e.g. the database went away: try again once the lease has ended
            log.exception("job item %s/%d", delivery.job_id, delivery.index)
            await self.queue.retry_later(delivery, self.settings.lease_s)
        finally:
            slot.release()

    async def _follow(self, job_id: str, index: int) -> None:
        """Enqueues a workflow's next step once the step `index` has succeeded."""
        request = await asyncio.to_thread(self.store.next_step, job_id, index)
        if request is not None:
            step = jobs_pb2.JobRequest.FromString(request)
            model = getattr(step, step.WhichOneof("request")).model
            await self.queue.put([Delivery(job_id, index + 1, model)])

    def _resolve(self, claim: Claim) -> tuple[Kind, str, bytes]:
        """The call to make: the claim's request, or a workflow step fed by the step before."""
        if claim.kind != WORKFLOW:
            return KINDS[claim.kind], claim.model, claim.request
        step = jobs_pb2.JobRequest.FromString(claim.request)
        if claim.previous_request is not None:
            before = jobs_pb2.JobRequest.FromString(claim.previous_request)
            answer = jobs_pb2.JobResponse.FromString(
                self.results.get(result_key(claim.tenant, claim.job_id, claim.index - 1)))
            step = workflow.feed(step, before.WhichOneof("request"), answer)
        kind = step.WhichOneof("request")
        request = getattr(step, kind)
        return KINDS[kind], request.model, request.SerializeToString()

    async def _run(self, claim: Claim) -> None:
        try:
            # Only a workflow step reads a file (the step before's result).
            kind, model, request = (await asyncio.to_thread(self._resolve, claim) if claim.kind == WORKFLOW
                                    else self._resolve(claim))
        except ValueError as exc:  # a workflow step got nothing it can take
            status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(exc))
            await asyncio.to_thread(self.store.finish, claim.job_id, claim.index, self.name,
                                    error=ItemError("INVALID_FIELD", str(exc), status.SerializeToString()))
            return
        call = asyncio.create_task(self._call_with_retries(kind, model, request, claim.tenant))
        while True:
            done, _ = await asyncio.wait({call}, timeout=self.settings.lease_s / 3)
            if done:
                break
            if not await asyncio.to_thread(self.store.renew, claim.job_id, claim.index, self.name, self.lease):
                call.cancel()  # cancelled, or the lease went to another worker
                with contextlib.suppress(asyncio.CancelledError):
                    await call
                log.info("job item %s/%d: stopped (cancelled or taken over)", claim.job_id, claim.index)
                return
        outcome = call.result()
        if isinstance(outcome, ItemError):
            await asyncio.to_thread(self.store.finish, claim.job_id, claim.index, self.name, error=outcome)
            return
        await asyncio.to_thread(self._keep, claim, outcome)

    def _keep(self, claim: Claim, result: bytes) -> None:
        """Still ours? Then store the result, then mark it stored (a result the database
        does not point to is never read). One thread hop for all three."""
        key = result_key(claim.tenant, claim.job_id, claim.index)
        if self.store.renew(claim.job_id, claim.index, self.name, self.lease):
            self.results.put(key, result)
            self.store.finish(claim.job_id, claim.index, self.name, result_key=key)

    async def _call_with_retries(self, kind: Kind, model: str, request: bytes, tenant: str) -> bytes | ItemError:
        metadata = [("x-aimesh-model", model)] if model else []
        if self.token_for is not None:
            token = await asyncio.to_thread(self.token_for, tenant, kind.capability)
            metadata.append(("authorization", f"Bearer {token}"))
        delay = 1.0
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                if kind.streaming:
                    call = self._channel.unary_stream(kind.path)(
                        request, metadata=metadata, timeout=self.settings.item_timeout_s)
                    messages = [message async for message in call]
                else:
                    messages = [await self._channel.unary_unary(kind.path)(
                        request, metadata=metadata, timeout=self.settings.item_timeout_s)]
                return job_response(kind, messages).SerializeToString()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in TRANSIENT or attempt == self.settings.max_attempts:
                    return error_of(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
        raise AssertionError("unreachable")
