"""The one server interceptor every aimesh server runs.

It (1) parses request bytes itself, so that bytes that do not decode get
INVALID_ARGUMENT instead of grpc-python's UNKNOWN "Unexpected DecodeError";
(2) admits calls into slots (`Admission`): a call over capacity queues within its
deadline or gets RESOURCE_EXHAUSTED with RetryInfo at once, before any byte of an
answer; (3) maps domain errors (AimeshError) to status + ErrorInfo, and any other exception
to INTERNAL with an incident id (the traceback only in the server log); (4) keeps the
account of every admitted call (runtime.accounting). Health and reflection calls pass
through untouched.

Response headers go out once, with the first message (or the unary answer): who served
the call (set by the servicer) and how long it queued (`x-aimesh-queue-wait-ms`,
`x-aimesh-queue-depth`: calls ahead of it plus itself when it arrived, 0 = no wait).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import namedtuple
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from . import accounting
from .admission import Admission, Ticket
from .cache import CACHE_HEADER, DETERMINISTIC, CachedAnswer, Lookup, Recording, ResponseCache
from .errors import DOMAIN, AimeshError, EngineFailure, MalformedRequest
from .service import SERVED_BY_METADATA, send_served_by, served_by
from .streams import CALL_EXECUTOR
from .tracing import CallTrace, CallTracer
from .watchdog import Watchdog

log = logging.getLogger(__name__)

_PASSTHROUGH = ("/grpc.health.v1.", "/grpc.reflection.")
# gRPC clients with a retry policy wait this long before their next attempt, or make
# none when it is negative: the SDK's retries follow RetryInfo through it.
PUSHBACK_HEADER = "grpc-retry-pushback-ms"


_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


def grpc_code(exc: AimeshError) -> grpc.StatusCode:
    return _GRPC_CODES[exc.code]


def status_of(exc: AimeshError) -> grpc.Status:
    """The AIP-193 status of a domain error: the error table's code, ErrorInfo, and
    BadRequest (a field) and RetryInfo (a delay) when the error has them."""
    details: list[Any] = [error_details_pb2.ErrorInfo(
        reason=exc.reason_name, domain=DOMAIN, metadata=exc.metadata)]
    if exc.field:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.message)]))
    if exc.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=exc.code, message=exc.message)
    for detail in details:
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


class _Status(namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    """A status with trailers of our own (grpc.Status is only an interface)."""


class _Outcome:
    """The final status of a call, as the account records it."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.OK
        self.reason = ""

    def set(self, code: grpc.StatusCode, reason: str = "") -> None:
        self.code, self.reason = code, reason


class AimeshServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, admission: Admission, executor: Executor | None = None,
                 watchdog: Watchdog | None = None, tracer: CallTracer | None = None,
                 *, cache: ResponseCache | None = None) -> None:
        self.admission = admission
        self.cache = cache  # None: no response cache
        self.executor = executor
        self.watchdog = watchdog
        self.tracer = tracer  # None: tracing off

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_PASSTHROUGH):
            return handler
        return self._wrap(handler, details.method)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer
        serialize = handler.response_serializer
        streams = handler.unary_stream is not None or handler.stream_stream is not None

        def serialize_or_stored(message: Any) -> bytes:
            """A cache hit hands back the stored bytes: they go out as they are."""
            return message if isinstance(message, bytes) else serialize(message)

        def decode(raw: bytes) -> Any:
            try:
                return parse(raw)
            except DecodeError as exc:
                raise MalformedRequest(
                    f"request bytes for {method} do not decode as its request message: {exc}"
                ) from exc

        async def decode_stream(raw_iter: AsyncIterator[bytes]) -> AsyncIterator[Any]:
            async for raw in raw_iter:
                yield decode(raw)

        async def admit(context: grpc.aio.ServicerContext) -> tuple[Ticket, CallTrace | None]:
            trace = self.tracer.begin(method, context, streams) if self.tracer is not None else None
            try:
                ticket = await self.admission.acquire(context.time_remaining())
            except AimeshError as exc:
                if trace is not None:
                    trace.refused(grpc_code(exc), exc)
                await self._abort(context, exc, method)
            if trace is not None:
                trace.admitted(ticket)
            CALL_EXECUTOR.set(self.executor)
            if self.watchdog is not None:
                self.watchdog.begin()
            return ticket, trace

        def finish(ticket: Ticket, account: accounting.CallAccount, outcome: _Outcome,
                   trace: CallTrace | None) -> None:
            account.end(outcome.code, outcome.reason)
            if trace is not None:
                trace.end(account, outcome.code, outcome.reason)
            self.admission.release(ticket)
            if self.watchdog is not None:
                self.watchdog.end()

        async def send_headers(context: grpc.aio.ServicerContext, ticket: Ticket,
                               cached: Lookup | None = None) -> None:
            queue = (("x-aimesh-queue-wait-ms", str(round(ticket.wait_s * 1000))),
                     ("x-aimesh-queue-depth", str(ticket.queue_depth)))
            miss = () if cached is None else ((CACHE_HEADER, "miss"),)
            await context.send_initial_metadata((*(SERVED_BY_METADATA.get() or ()), *queue, *miss))

        async def fail(context: grpc.aio.ServicerContext, exc: BaseException, outcome: _Outcome) -> None:
            """Records why the call ended and answers with the right status."""
            if isinstance(exc, AimeshError):
                outcome.set(grpc_code(exc), exc.reason_name)
                await self._abort(context, exc, method)
            elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                outcome.set(grpc.StatusCode.CANCELLED)
            elif isinstance(exc, (grpc.aio.AbortError, grpc.aio.UsageError)):
                code = context.code()
                outcome.set(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN)
            else:  # a bug or an engine crash: a clean status; what failed stays in our log
                incident = uuid.uuid4().hex[:16]
                log.error("%s failed, incident %s", method, incident, exc_info=exc)
                failure = EngineFailure(f"{method} failed with an internal error (incident {incident})",
                                        metadata={"incident_id": incident})
                outcome.set(grpc_code(failure), failure.reason_name)
                await self._abort(context, failure, method)

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary
            streaming_request = handler.stream_unary is not None

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                cached = None if streaming_request else await self._look_up(method, decode, request, context)
                if cached is not None and cached.answer is not None:
                    (answer,) = [message async for message in self._replay(method, cached, context)]
                    return answer
                ticket, trace = await admit(context)
                account = accounting.begin(method, context)
                outcome = _Outcome()
                try:
                    req = decode_stream(request) if streaming_request else (
                        cached.request if cached is not None else decode(request))
                    response = await inner(req, context)
                    account.observe(response)
                    await send_headers(context, ticket, cached)
                    if cached is not None:
                        await self._store(cached, [serialize(response)], account)
                    return response
                except BaseException as exc:
                    await fail(context, exc, outcome)
                    raise
                finally:
                    finish(ticket, account, outcome, trace)

            factory = (
                grpc.stream_unary_rpc_method_handler
                if streaming_request
                else grpc.unary_unary_rpc_method_handler
            )
            return factory(unary_response, None, serialize_or_stored)

        inner_stream = handler.unary_stream or handler.stream_stream
        streaming_request = handler.stream_stream is not None

        async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
            cached = None if streaming_request else await self._look_up(method, decode, request, context)
            if cached is not None and cached.answer is not None:
                async for message in self._replay(method, cached, context):
                    yield message
                return
            ticket, trace = await admit(context)
            account = accounting.begin(method, context)
            outcome = _Outcome()
            recording = Recording(self.cache.max_entry_bytes) if self.cache and cached else None
            try:
                req = decode_stream(request) if streaming_request else (
                    cached.request if cached is not None else decode(request))
                first = True
                async for response in inner_stream(req, context):
                    account.observe(response)
                    if self.watchdog is not None:
                        self.watchdog.progress()
                    if first:
                        await send_headers(context, ticket, cached)
                    first = False
                    yield response
                    if recording is not None:
                        recording.add(serialize(response))
                # Only a stream that ran to its end is stored (a cancelled one raised above).
                if recording is not None and recording.complete and not context.cancelled():
                    await self._store(cached, recording.messages, account)
            except BaseException as exc:
                await fail(context, exc, outcome)
                raise
            finally:
                finish(ticket, account, outcome, trace)

        factory = (
            grpc.stream_stream_rpc_method_handler
            if streaming_request
            else grpc.unary_stream_rpc_method_handler
        )
        return factory(stream_response, None, serialize_or_stored)

    async def _look_up(self, method: str, decode: Callable[[bytes], Any], raw: bytes,
                       context: grpc.aio.ServicerContext) -> Lookup | None:
        """The cache's view of a call (None: not cacheable here), before it takes a slot."""
        if self.cache is None or method not in DETERMINISTIC:
            return None
        try:
            request = decode(raw)
        except MalformedRequest:
            return None  # the call itself answers INVALID_ARGUMENT
        return await self.cache.lookup(method, request, dict(context.invocation_metadata() or ()))

    async def _replay(self, method: str, cached: Lookup, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[bytes]:
        """A hit: the stored messages with the headers and the account of a served call
        (marked as a hit, with the stored answer's units), without an engine slot."""
        assert cached.answer is not None and self.cache is not None
        account = accounting.begin(method, context)
        account.cache_hit = True
        account.set_units(cached.answer.unit, cached.answer.input_units, cached.answer.output_units)
        outcome = _Outcome()
        try:
            await send_served_by(context, served_by(cached.model, self.cache.pool, cached.asked))
            await context.send_initial_metadata((*(SERVED_BY_METADATA.get() or ()), (CACHE_HEADER, "hit")))
            for message in cached.answer.messages:
                account.first_output_s = account.first_output_s or time.monotonic() - account.started
                yield message
        except BaseException as exc:
            cancelled = isinstance(exc, (asyncio.CancelledError, GeneratorExit))
            outcome.set(grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN)
            raise
        finally:
            account.end(outcome.code, outcome.reason)

    async def _store(self, cached: Lookup, messages: list[bytes], account: accounting.CallAccount) -> None:
        assert self.cache is not None
        await self.cache.store(cached.key, CachedAnswer(
            tuple(messages), account.unit, account.input_units, account.output_units))

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: AimeshError, method: str) -> None:
        code = grpc_code(exc)
        log.debug("%s -> %s %s: %s", method, code.name, exc.reason_name, exc.message)  # per call: DEBUG only
        status = status_of(exc)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and exc.retry_after_s is not None:
            # A retry the caller's deadline cannot wait for would only fail later: say none.
            remaining = context.time_remaining()
            fits = remaining is None or exc.retry_after_s < remaining
            pushback = str(round(exc.retry_after_s * 1000)) if fits else "-1"
            status = _Status(status.code, status.details,
                             (*status.trailing_metadata, (PUSHBACK_HEADER, pushback)))
        await context.abort_with_status(status)
