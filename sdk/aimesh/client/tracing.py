"""Trace context on every call, when the caller uses OpenTelemetry.

opentelemetry-api is optional for the SDK: without it, or with no tracer provider set
and no span active, a call carries nothing extra. With a provider configured, each call
gets a client span of its own (`{service}/{method}`, rpc.* attributes, the final gRPC
code); either way the context (that span, or the caller's active one) goes out as W3C
`traceparent` metadata, which Envoy and the model servers continue. The span is never
made current (nothing is attached), so a stream may end it from another coroutine step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # optional: tracing is simply off
    trace = None

_TRACER_NAME = "aimesh.client"


@contextmanager
def traced(method: Any) -> Iterator[list[tuple[str, str]]]:
    """The metadata that carries the trace context of a call to `method` (a gRPC
    multicallable), inside the call's client span; the span ends with the block."""
    if trace is None:
        yield []
        return
    active = trace.get_current_span()
    if not active.get_span_context().is_valid and isinstance(trace.get_tracer_provider(),
                                                              trace.ProxyTracerProvider):
        yield []  # no provider set and no span active: nothing to send
        return
    # grpc-python keeps a multicallable's full method name here: bytes in plain sync and
    # asyncio stubs, str behind a client interceptor (grpc.intercept_channel).
    full = getattr(method, "_method", b"")
    full = (full.decode() if isinstance(full, bytes) else str(full)).lstrip("/")
    service, _, name = full.partition("/")
    span = trace.get_tracer(_TRACER_NAME).start_span(full or "aimesh", kind=SpanKind.CLIENT, attributes={
        "rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    try:
        yield list(carrier.items())
    except BaseException as exc:
        code = getattr(exc, "code", None)
        if isinstance(code, grpc.StatusCode):
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {getattr(exc, 'message', '')}"))
        else:  # the caller left a stream early (GeneratorExit) or was cancelled
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.CANCELLED.value[0])
        raise
    else:
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
    finally:
        span.end()
