"""OpenTelemetry spans of the calls a model server answers (W3C trace context).

Off unless an OTLP endpoint is configured (`AIMESH_OTLP_ENDPOINT`): then the server
owns a `CallTracer` (its own TracerProvider, a parent-based ratio sampler
`AIMESH_TRACE_SAMPLE_RATIO`, a BatchSpanProcessor exporting over OTLP/gRPC) and the
interceptor opens a `CallTrace` per call. With tracing off nothing is imported from
the OpenTelemetry SDK, the interceptor skips every hook, and `stage()` / `stages()`
hand back shared no-op objects.

Spans of one call, all in the trace of the caller's `traceparent` (Envoy's upstream
span when it came through the front door):
- the server span `{service}/{method}` (rpc.* semantic conventions, aimesh.* for the
  rest: model, version, tenant, units, finish reason; the server's pool and replica
  address are on the resource);
- `aimesh.admission`: the wait for a slot, when the call queued (a refusal ends there,
  RESOURCE_EXHAUSTED); a call admitted at once has no such span;
- model work by stage, opened by the engines: `stage()` around a piece of work on the
  event loop (an embedding batch, diffusion, an audio window), `stages()` for work a
  scheduler thread moves through (text: `prefill`, then `decode`);
- `aimesh.result` (streamed answers): from the first message to the end of the stream.
Spans cost CPU (measured here: ~30 us to make and ~60 us to encode and export each), so
a unary call admitted at once makes two: its own and its model work.
Stage spans are never made current (no context attach), so they may be opened in one
coroutine step and closed in another, or on another thread.
"""

from __future__ import annotations

import contextvars
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from .accounting import CallAccount
    from .admission import Ticket
    from .errors import AimeshError
    from .settings import ServerSettings

# Server spans whose status is Error, per the OpenTelemetry gRPC conventions; the other
# codes (a refusal, a cancellation, bad input) are the caller's business and stay Unset.
_SERVER_ERRORS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})
SERVICE_NAME = "aimesh-server"


class CallTracer:
    """A server's tracer: one per ModelServer, so servers in one process stay apart. What
    is the same for every call (the server's pool, its replica address) is a resource
    attribute, exported once per batch of spans instead of once per span."""

    def __init__(self, endpoint: str, sample_ratio: float = 1.0, pool: str = "") -> None:
        self.endpoint, self.sample_ratio, self.pool = endpoint, sample_ratio, pool
        self.provider: TracerProvider | None = None  # made by bind()

    def bind(self, replica: str) -> None:
        """Starts exporting, as the server at `replica` (host:port); before its first call."""
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(
            resource=Resource.create({"service.name": SERVICE_NAME, "service.instance.id": replica,
                                      "aimesh.replica": replica, "aimesh.pool": self.pool}),
            sampler=ParentBased(TraceIdRatioBased(self.sample_ratio)),
        )
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=self.endpoint, insecure=True)))
        self.tracer = self.provider.get_tracer("aimesh.server")
        self.propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> CallTracer | None:
        if not settings.otlp_endpoint:
            return None
        return cls(settings.otlp_endpoint, settings.trace_sample_ratio, settings.pool)

    def begin(self, method: str, context: grpc.aio.ServicerContext, streams: bool) -> CallTrace:
        """The server span of a call, continuing the caller's trace; current for its stages."""
        metadata = dict(context.invocation_metadata() or ())
        parent = self.propagator.extract(metadata)
        service, _, name = method.lstrip("/").partition("/")
        span = self.tracer.start_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes={
            "rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
        trace = CallTrace(self, span, streams)
        _CURRENT.set(trace)
        return trace

    def shutdown(self) -> None:
        """Exports what is still queued, then stops."""
        if self.provider is not None:
            self.provider.shutdown()


class CallTrace:
    """The spans of one call."""

    __slots__ = ("_parent", "finish_reason", "span", "streams", "tracer")

    def __init__(self, tracer: CallTracer, span: Span, streams: bool) -> None:
        self.tracer = tracer
        self.span = span
        self.streams = streams  # the answer is a stream (it gets a result span)
        self.finish_reason: str | None = None  # the engine's, when it states one
        self._parent = set_span_in_context(span)

    def child(self, name: str, start_ns: int | None = None, attributes: dict[str, Any] | None = None) -> Span:
        return self.tracer.tracer.start_span(name, context=self._parent, start_time=start_ns,
                                             attributes=attributes)

    def admitted(self, ticket: Ticket) -> None:
        if not ticket.queue_depth:
            return  # a slot was free: nothing waited
        now = time.time_ns()
        self.child("aimesh.admission", now - int(ticket.wait_s * 1e9), {
            "aimesh.queue.wait_ms": round(ticket.wait_s * 1000, 3),
            "aimesh.queue.depth": ticket.queue_depth,
        }).end(now)

    def refused(self, code: grpc.StatusCode, exc: AimeshError) -> None:
        """No slot: the admission span and the call end here, with the refusal's status."""
        span = self.child("aimesh.admission", attributes={"aimesh.error.reason": exc.reason_name})
        span.set_status(Status(StatusCode.ERROR, exc.message))
        span.end()
        self._finish(code, exc.reason_name, {})

    def end(self, account: CallAccount, code: grpc.StatusCode, reason: str) -> None:
        # Only what the call itself adds, and only when known: each attribute costs CPU to
        # make and export (~3 us), and the request id is on Envoy's span already.
        model = account.served_model or account.requested_model
        attributes: dict[str, Any] = {"aimesh.model": model, "aimesh.model.version": account.served_version}
        if account.requested_model and account.requested_model != model:  # an alias
            attributes["aimesh.model.requested"] = account.requested_model
        if account.pool and account.pool != self.tracer.pool:
            attributes["aimesh.pool"] = account.pool
        if account.tenant:
            attributes["aimesh.tenant"] = account.tenant
        if account.unit:
            attributes.update({"aimesh.units.unit": account.unit,
                               "aimesh.units.input": account.input_units,
                               "aimesh.units.output": account.output_units})
        if self.streams and account.first_output_s is not None:
            started = time.time_ns() - int((time.monotonic() - account.started - account.first_output_s) * 1e9)
            self.child("aimesh.result", started).end()
        self._finish(code, reason, attributes)

    def _finish(self, code: grpc.StatusCode, reason: str, attributes: dict[str, Any]) -> None:
        attributes["rpc.grpc.status_code"] = code.value[0]
        attributes["aimesh.finish_reason"] = self.finish_reason or reason or (
            "complete" if code == grpc.StatusCode.OK else code.name.lower())
        if reason:
            attributes["aimesh.error.reason"] = reason
        self.span.set_attributes(attributes)
        if code in _SERVER_ERRORS:
            self.span.set_status(Status(StatusCode.ERROR, reason or code.name))
        self.span.end()


_CURRENT: contextvars.ContextVar[CallTrace | None] = contextvars.ContextVar(
    "aimesh_call_trace", default=None)


class _Stage(AbstractContextManager["_Stage"]):
    """A model-work span of the current call, from `with` to its end (an exception marks it)."""

    def __init__(self, trace: CallTrace, name: str, attributes: dict[str, Any]) -> None:
        self.span = trace.child(name, attributes=attributes)

    def set(self, **attributes: Any) -> None:
        self.span.set_attributes({f"aimesh.{k}": v for k, v in attributes.items()})

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, Exception):
            self.span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        elif exc is not None:  # the caller left (GeneratorExit) or cancelled the call
            self.span.set_attribute("aimesh.cancelled", True)
        self.span.end()


class _NoStage(AbstractContextManager["_NoStage"]):
    def set(self, **attributes: Any) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        pass


_NO_STAGE = _NoStage()


def stage(name: str, **attributes: Any) -> _Stage | _NoStage:
    """`with stage("embedding.batch", texts=3) as s: ...; s.set(tokens=12)`"""
    trace = _CURRENT.get()
    if trace is None:
        return _NO_STAGE
    return _Stage(trace, name, {f"aimesh.{k}": v for k, v in attributes.items()})


class Stages:
    """Consecutive stage spans of one call's work on another thread (text: prefill, then
    decode): `enter` ends the open stage and opens the next, `close` ends the last and
    states the call's finish reason. Made where the call's context is (its coroutine)."""

    def __init__(self, trace: CallTrace) -> None:
        self.trace = trace
        self._open: Span | None = None

    def enter(self, name: str, **attributes: Any) -> None:
        span = self.trace.child(name, attributes={f"aimesh.{k}": v for k, v in attributes.items()})
        previous, self._open = self._open, span
        if previous is not None:
            previous.end()

    def close(self, finish_reason: str, **attributes: Any) -> None:
        last, self._open = self._open, None
        if last is not None:
            last.set_attributes({f"aimesh.{k}": v for k, v in attributes.items()})
            last.end()
        self.trace.finish_reason = finish_reason


class NoStages:
    def enter(self, name: str, **attributes: Any) -> None:
        pass

    def close(self, finish_reason: str, **attributes: Any) -> None:
        pass


_NO_STAGES = NoStages()


def stages() -> Stages | NoStages:
    trace = _CURRENT.get()
    return _NO_STAGES if trace is None else Stages(trace)
