"""A real OTLP/gRPC trace receiver for tests: the collector's TraceService (from the
opentelemetry-proto package) on a free loopback port, keeping every span it is sent."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name: who sent it
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    attributes: dict[str, Any] = field(hash=False)
    status_code: int  # opentelemetry.proto.trace.v1.Status.StatusCode: 0 unset, 1 ok, 2 error
    start_ns: int
    end_ns: int
    resource: dict[str, Any] = field(hash=False)  # who sent it: service.name, aimesh.pool...


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(
                        service=str(resource.get("service.name", "")), trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(), parent_id=span.parent_span_id.hex(), name=span.name,
                        kind=span.kind, attributes={a.key: _value(a.value) for a in span.attributes},
                        status_code=span.status.code, start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano, resource=resource))
        with self._lock:
            self._spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, condition: Callable[[list[ReceivedSpan]], bool], what: str,
                 timeout: float = 60.0, trace_id: str | None = None) -> list[ReceivedSpan]:
        """The spans (of `trace_id`, if given) once `condition` holds for them."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans if trace_id is None else self.trace(trace_id)
            if condition(spans):
                return spans
            if time.monotonic() > deadline:
                shown = "\n".join(f"  {s.service} {s.name} {s.span_id} <- {s.parent_id} {s.attributes}"
                                  for s in spans)
                raise AssertionError(f"never received {what}; got:\n{shown}")
            time.sleep(0.1)


def running_receiver() -> Iterator[OtlpReceiver]:
    """For a pytest fixture: `yield from running_receiver()`."""
    receiver = OtlpReceiver()
    receiver.server.start()
    try:
        yield receiver
    finally:
        receiver.server.stop(1)


@contextlib.contextmanager
def caller_tracing(endpoint: str) -> Iterator[BatchSpanProcessor]:
    """This (test) process's spans exported to `endpoint` while the block runs, through
    the global tracer provider the SDK's spans use (set once per process; a processor
    per block, shut down at its end)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider(resource=Resource.create({"service.name": "test-caller"})))
        provider = trace.get_tracer_provider()
    processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True))
    provider.add_span_processor(processor)  # type: ignore[attr-defined]
    try:
        yield processor
    finally:
        processor.shutdown()


if __name__ == "__main__":  # a receiver process of its own (the benchmarks' collector)
    import signal
    import sys

    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # before gRPC's threads start
    standalone = OtlpReceiver()
    standalone.server.start()
    print(f"otlp receiver on {standalone.endpoint}", flush=True)
    signal.sigwait(stop_signals)
    print(f"received {len(standalone.spans)} spans", flush=True)
    standalone.server.stop(1)
    sys.exit(0)
