"""What one call used, as the model server that ran it saw it.

The interceptor opens a `CallAccount` for every admitted call (`begin`), shows it every
response message (`observe`: a message with a `usage` field sets the units), and closes
it with the final status (`end`). Servicers that know units as they go (text streams,
token by token) call `current().set_units(...)`, so a stream the caller cancels still
reports what it produced. Closed accounts go to every installed `UsageSink` (the mesh's
usage collector, the server's metrics) off the hot path; with no sink they are dropped.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from .logs import trace_id_of
from .service import SERVED_BY_METADATA

TENANT_HEADER = "x-aimesh-tenant"
REQUEST_ID_HEADER = "x-request-id"
MODEL_HEADER = "x-aimesh-model"


@dataclass
class CallAccount:
    method: str  # full gRPC method, "/aimesh.text.v1.TextGenerationService/Generate"
    request_id: str
    tenant: str
    requested_model: str
    started_wall: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    unit: str = ""
    input_units: float = 0.0
    output_units: float = 0.0
    first_output_s: float | None = None
    duration_s: float = 0.0
    status: str = "OK"
    reason: str = ""
    served_model: str = ""
    served_version: str = ""
    pool: str = ""
    trace_id: str = ""  # of the caller's traceparent, for log lines
    cache_hit: bool = False  # answered from the response cache (runtime/cache.py)

    def set_units(self, unit: str, input_units: float, output_units: float) -> None:
        """Units so far (absolute, not a delta)."""
        self.unit, self.input_units, self.output_units = unit, float(input_units), float(output_units)

    def observe(self, response: Any) -> None:
        if self.first_output_s is None:
            self.first_output_s = time.monotonic() - self.started
        usage = _usage_of(response)
        if usage is not None:
            self.set_units(*usage)

    def end(self, code: grpc.StatusCode, reason: str = "") -> None:
        self.duration_s = time.monotonic() - self.started
        self.status = code.name
        self.reason = reason
        served = dict(SERVED_BY_METADATA.get() or ())
        self.served_model = served.get("x-aimesh-served-model", "")
        self.served_version = served.get("x-aimesh-served-version", "")
        self.pool = served.get("x-aimesh-pool", "")
        for sink in _sinks:
            sink.submit(self)


def _usage_of(response: Any) -> tuple[str, float, float] | None:
    """(unit, input, output) from a response's `usage` (or its `result.usage`), if set."""
    for holder in (response, getattr(response, "result", None)):
        if holder is None or not hasattr(holder, "HasField"):
            continue
        try:
            if not holder.HasField("usage"):
                continue
        except ValueError:  # no such field in this message
            continue
        usage = holder.usage
        if hasattr(usage, "prompt_tokens"):  # aimesh.text.v1.TokenUsage
            return "tokens", usage.prompt_tokens, usage.completion_tokens
        return usage.unit, usage.input_units, usage.output_units
    return None


_CURRENT: contextvars.ContextVar[CallAccount | None] = contextvars.ContextVar(
    "aimesh_call_account", default=None)


def begin(method: str, context: grpc.aio.ServicerContext) -> CallAccount:
    metadata = dict(context.invocation_metadata() or ())
    account = CallAccount(
        method=method, request_id=metadata.get(REQUEST_ID_HEADER, ""),
        tenant=metadata.get(TENANT_HEADER, ""), requested_model=metadata.get(MODEL_HEADER, ""),
        trace_id=trace_id_of(metadata.get("traceparent", "")))
    _CURRENT.set(account)
    return account


def current() -> CallAccount | None:
    """The account of the call this code runs for (None outside a call)."""
    return _CURRENT.get()


class UsageSink(Protocol):
    def submit(self, account: CallAccount) -> None:
        """Must not block: queue and return."""


_sinks: tuple[UsageSink, ...] = ()


def install_sink(sink: UsageSink | None) -> None:
    """Adds `sink` beside those installed; None removes every sink."""
    global _sinks
    _sinks = () if sink is None else (*_sinks, sink)
