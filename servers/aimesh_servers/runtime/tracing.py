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
  rest: model, version, pool, replica, tenant, units, finish reason);
- `aimesh.admission`: waiting for a slot (a refusal ends there, RESOURCE_EXHAUSTED);
- model work by stage, opened by the engines: `stage()` around a piece of work on the
  event loop (an embedding batch, diffusion, an audio window), `stages()` for work a
  scheduler thread moves through (text: `prefill`, then `decode`);
- `aimesh.result`: from the first answer message to the end of the call.
Stage spans are never made current (no context attach), so they may be opened in one
coroutine step and closed in another, or on another thread.
"""

from __future__ import annotations

import contextvars
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from opentelemetry.trace import Span

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
    """A server's tracer: one per ModelServer, so servers in one process stay apart."""

    def __init__(self, endpoint: str, sample_ratio: float = 1.0, pool: str = "") -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(
            resource=Resource.create({"service.name": SERVICE_NAME, "aimesh.pool": pool}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        )
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
        self.tracer = self.provider.get_tracer("aimesh.server")
        self.propagator = TraceContextTextMapPropagator()
        self.pool = pool
        self.replica = ""  # host:port, known once the server bound its port

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> CallTracer | None:
        if not settings.otlp_endpoint:
            return None
        return cls(settings.otlp_endpoint, settings.trace_sample_ratio, settings.pool)

    def begin(self, method: str, context: grpc.aio.ServicerContext) -> CallTrace:
        """The server span of a call, continuing the caller's trace; current for its stages."""
        from opentelemetry.trace import SpanKind

        metadata = dict(context.invocation_metadata() or ())
        parent = self.propagator.extract(metadata)
        service, _, name = method.lstrip("/").partition("/")
        span = self.tracer.start_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes={
            "rpc.system": "grpc", "rpc.service": service, "rpc.method": name,
            "aimesh.replica": self.replica, "aimesh.pool": self.pool,
        })
        trace = CallTrace(self, span)
        _CURRENT.set(trace)
        return trace

    def shutdown(self) -> None:
        """Exports what is still queued, then stops."""
        self.provider.shutdown()


class CallTrace:
    """The spans of one call."""

    __slots__ = ("tracer", "span", "finish_reason", "_parent")

    def __init__(self, tracer: CallTracer, span: Span) -> None:
        from opentelemetry.trace import set_span_in_context

        self.tracer = tracer
        self.span = span
        self.finish_reason: str | None = None  # the engine's, when it states one
        self._parent = set_span_in_context(span)

    def child(self, name: str, start_ns: int | None = None, attributes: dict[str, Any] | None = None) -> Span:
        return self.tracer.tracer.start_span(name, context=self._parent, start_time=start_ns,
                                             attributes=attributes)

    def admitted(self, ticket: Ticket) -> None:
        now = time.time_ns()
        self.child("aimesh.admission", now - int(ticket.wait_s * 1e9), {
            "aimesh.queue.wait_ms": round(ticket.wait_s * 1000, 3),
            "aimesh.queue.depth": ticket.queue_depth,
        }).end(now)

    def refused(self, code: grpc.StatusCode, exc: AimeshError) -> None:
        """No slot: the admission span and the call end here, with the refusal's status."""
        from opentelemetry.trace import Status, StatusCode

        span = self.child("aimesh.admission", attributes={"aimesh.error.reason": exc.reason_name})
        span.set_status(Status(StatusCode.ERROR, exc.message))
        span.end()
        self._finish(code, exc.reason_name)

    def end(self, account: CallAccount, code: grpc.StatusCode, reason: str) -> None:
        attributes: dict[str, Any] = {
            "aimesh.model": account.served_model or account.requested_model,
            "aimesh.model.requested": account.requested_model,
            "aimesh.model.version": account.served_version,
            "aimesh.tenant": account.tenant,
            "aimesh.request_id": account.request_id,
        }
        if account.pool:
            attributes["aimesh.pool"] = account.pool
        if account.unit:
            attributes.update({"aimesh.units.unit": account.unit,
                               "aimesh.units.input": account.input_units,
                               "aimesh.units.output": account.output_units})
        self.span.set_attributes(attributes)
        if account.first_output_s is not None:
            started = time.time_ns() - int((time.monotonic() - account.started - account.first_output_s) * 1e9)
            self.child("aimesh.result", started, {
                "aimesh.first_output_ms": round(account.first_output_s * 1000, 3)}).end()
        self._finish(code, reason)

    def _finish(self, code: grpc.StatusCode, reason: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        finish = self.finish_reason or reason or ("complete" if code == grpc.StatusCode.OK
                                                  else code.name.lower())
        self.span.set_attributes({"rpc.grpc.status_code": code.value[0], "aimesh.finish_reason": finish})
        if reason:
            self.span.set_attribute("aimesh.error.reason", reason)
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
        self.span.set_attributes(attributes)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, Exception):
            from opentelemetry.trace import Status, StatusCode

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
