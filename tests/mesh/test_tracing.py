"""One trace from the SDK through real Envoy to the model server that answered, exported to
a real OTLP/gRPC receiver in this process.

`aimesh up --otlp` (Envoy's OpenTelemetry tracer) serves model `chat` through two pools,
primary -> secondary; the test starts both servers with the same endpoint, and this
process exports its own spans (a caller span around each call, and the SDK's client span)
to the receiver as well. Each call's trace is found by its caller span's trace id.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import aimesh
import pytest
from opentelemetry import trace
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from tests.mesh.conftest import Mesh
from tests.mesh.test_fallback import HI, REGISTRY, start, wait_routed
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan, caller_tracing, running_receiver

pytestmark = pytest.mark.mesh

SERVER_KIND = trace_pb2.Span.SpanKind.SPAN_KIND_SERVER
CLIENT_KIND = trace_pb2.Span.SpanKind.SPAN_KIND_CLIENT
STATUS_ERROR = trace_pb2.Status.StatusCode.STATUS_CODE_ERROR
GENERATE = "aimesh.text.v1.TextGenerationService/Generate"
STREAM = "aimesh.text.v1.TextGenerationService/StreamGenerate"
ENVOY = "aimesh-front-door"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    yield from running_receiver()


@pytest.fixture(scope="module")
def exporter(receiver: OtlpReceiver) -> Iterator[BatchSpanProcessor]:
    with caller_tracing(receiver.endpoint) as processor:
        yield processor


@pytest.fixture(scope="module")
def traced_chain(tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver) -> Iterator[Mesh]:
    folder = tmp_path_factory.mktemp("traced")
    (folder / "registry.yaml").write_text(REGISTRY)
    mesh = Mesh(folder / "state", registry=folder / "registry.yaml", extra_args=["--otlp", receiver.endpoint])
    try:
        mesh.wait_ready()
        yield mesh
    finally:
        mesh.stop()


def traced_start(mesh: Mesh, receiver: OtlpReceiver, pool: str, **env: str):
    return start(mesh, pool, AIMESH_OTLP_ENDPOINT=receiver.endpoint, **env)


def in_caller_span(exporter: BatchSpanProcessor, call) -> tuple[str, object]:
    """Runs `call` inside a caller span of this process; its trace id and `call`'s result."""
    with trace.get_tracer("test").start_as_current_span("caller") as caller:
        result = call()
    exporter.force_flush()
    return format(caller.get_span_context().trace_id, "032x"), result


def server_spans(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [s for s in spans if s.service == "aimesh-server" and s.kind == SERVER_KIND]


def parent_of(span: ReceivedSpan, spans: list[ReceivedSpan]) -> ReceivedSpan:
    found = [s for s in spans if s.span_id == span.parent_id]
    assert found, f"the parent {span.parent_id} of {span.name} is not in the trace"
    return found[0]


def path_to_root(span: ReceivedSpan, spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    path = [span]
    while path[-1].parent_id:
        path.append(parent_of(path[-1], spans))
    return path


def failed_attempt(span: ReceivedSpan) -> bool:
    """An Envoy upstream attempt that failed (Envoy tags it `error`, not with a span status)."""
    return span.service == ENVOY and span.attributes.get("error") == "true"


def children(span: ReceivedSpan, spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.name: s for s in spans if s.parent_id == span.span_id}


def test_sdk_envoy_and_server_spans_form_one_trace_with_the_call_attributes(traced_chain, receiver, exporter):
    primary = traced_start(traced_chain, receiver, "primary")
    try:
        wait_routed(traced_chain, "primary")
        with aimesh.Client(traced_chain.front, max_attempts=1, timeout=60) as client:
            trace_id, answer = in_caller_span(
                exporter, lambda: client.text.generate("chat", HI, max_tokens=2))
    finally:
        primary.stop()  # drains: its last spans are exported
    assert answer.served_by.pool == "primary"
    spans = receiver.wait_for(
        lambda got: server_spans(got) and any(s.name == "text.decode" for s in got)
        and any(s.service == ENVOY for s in got),
        "the server's and Envoy's spans of the call", trace_id=trace_id)
    server = server_spans(spans)[0]
    path = path_to_root(server, spans)
    # server <- Envoy (upstream attempt, then its downstream span) <- SDK client span <- caller
    assert path[-1].name == "caller" and path[-2].name == GENERATE and path[-2].kind == CLIENT_KIND
    assert path[-2].service == "test-caller"
    envoy = path[1:-2]
    assert envoy and all(s.service == ENVOY for s in envoy), [(s.service, s.name) for s in path]
    assert server.name == GENERATE
    attributes = server.attributes
    assert attributes["rpc.system"] == "grpc" and attributes["rpc.method"] == "Generate"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["aimesh.model"] == "chat" and attributes["aimesh.model.version"] == "1"
    assert server.resource["aimesh.pool"] == "primary"
    assert server.resource["aimesh.replica"] == f"127.0.0.1:{primary.port}"
    assert attributes["aimesh.units.unit"] == "tokens" and attributes["aimesh.units.output"] == 2
    assert attributes["aimesh.finish_reason"] == "length"
    # Admitted at once and answered in one message: no admission or result span, only the work.
    stages = children(server, spans)
    assert set(stages) == {"text.prefill", "text.decode"}, stages
    assert stages["text.prefill"].attributes["aimesh.prompt_tokens"] > 0


def test_a_refused_primary_shows_its_refusal_and_the_fallback_attempt_in_one_trace(
        traced_chain, receiver, exporter):
    # One slot and no queue: while a direct stream holds it, the primary refuses at once.
    primary = traced_start(traced_chain, receiver, "primary", AIMESH_MAX_CONCURRENCY="1",
                           AIMESH_TEXT_MAX_BATCH="1", AIMESH_MAX_QUEUE="0")
    secondary = traced_start(traced_chain, receiver, "secondary")
    try:
        wait_routed(traced_chain, "primary")
        with aimesh.Client(f"127.0.0.1:{primary.port}", max_attempts=1) as direct:
            hog = direct.text.stream_generate("chat", [("user", "Write a long story.")], max_tokens=400)
            next(hog)
            with aimesh.Client(traced_chain.front, max_attempts=1, timeout=60) as client:
                trace_id, answer = in_caller_span(
                    exporter, lambda: client.text.generate("chat", HI, max_tokens=1))
            hog.close()
    finally:
        primary.stop()
        secondary.stop()
    assert answer.served_by.pool == "secondary"
    spans = receiver.wait_for(lambda got: len(server_spans(got)) >= 2,
                              "the primary's refusal and the secondary's answer", trace_id=trace_id)
    by_pool = {s.resource["aimesh.pool"]: s for s in server_spans(spans)}
    refused, served = by_pool["primary"], by_pool["secondary"]
    assert refused.attributes["rpc.grpc.status_code"] == 8  # RESOURCE_EXHAUSTED
    assert refused.attributes["aimesh.error.reason"] == "SERVER_BUSY"
    admission = children(refused, spans)["aimesh.admission"]
    assert admission.status_code == STATUS_ERROR
    assert served.attributes["rpc.grpc.status_code"] == 0
    # Two upstream attempts of one Envoy request: each server span hangs off its own.
    refused_attempt, served_attempt = parent_of(refused, spans), parent_of(served, spans)
    assert refused_attempt.service == served_attempt.service == ENVOY
    assert refused_attempt.span_id != served_attempt.span_id
    assert refused_attempt.parent_id == served_attempt.parent_id


def test_a_killed_primary_shows_the_failed_attempt_and_the_retry_to_the_next_pool(
        traced_chain, receiver, exporter):
    primary = traced_start(traced_chain, receiver, "primary")
    secondary = traced_start(traced_chain, receiver, "secondary")
    try:
        wait_routed(traced_chain, "primary")
        primary.terminate(signal.SIGKILL)
        primary.proc.wait(30)
        with aimesh.Client(traced_chain.front, max_attempts=1, timeout=60) as client:
            # The first call after the kill, before health checks notice, tries the dead host.
            trace_id, answer = in_caller_span(
                exporter, lambda: client.text.generate("chat", HI, max_tokens=1))
    finally:
        primary.stop()
        secondary.stop()
    assert answer.served_by.pool == "secondary"
    spans = receiver.wait_for(lambda got: len(server_spans(got)) >= 1 and any(map(failed_attempt, got)),
                              "the failed attempt and the secondary's answer", trace_id=trace_id)
    served = server_spans(spans)[0]
    assert served.resource["aimesh.pool"] == "secondary"
    served_attempt = parent_of(served, spans)
    assert served_attempt.attributes["retry.count"] == "1"
    failed = [s for s in spans if failed_attempt(s)]
    assert len(failed) == 1 and failed[0].parent_id == served_attempt.parent_id
    assert failed[0].attributes["response_flags"] == "UF"  # upstream connection failure


def test_a_stream_the_caller_leaves_is_a_cancelled_span(traced_chain, receiver, exporter):
    primary = traced_start(traced_chain, receiver, "primary")
    try:
        wait_routed(traced_chain, "primary")
        with aimesh.Client(traced_chain.front, max_attempts=1, timeout=60) as client:
            def leave_early() -> None:
                stream = client.text.stream_generate("chat", [("user", "Write a long story.")],
                                                     max_tokens=300)
                next(stream)
                stream.close()

            trace_id, _ = in_caller_span(exporter, leave_early)
        spans = receiver.wait_for(lambda got: any(s.name == "text.decode" for s in got),
                                  "the cancelled stream's spans", trace_id=trace_id)
    finally:
        primary.stop()
    server = server_spans(spans)[0]
    assert server.name == STREAM
    assert server.attributes["rpc.grpc.status_code"] == 1  # CANCELLED
    assert server.attributes["aimesh.finish_reason"] == "cancelled"
    stages = children(server, spans)
    assert "aimesh.result" in stages  # a stream: from its first message to its end
    decode = stages["text.decode"]
    assert decode.attributes["aimesh.completion_tokens"] < 300
    client_span = next(s for s in spans if s.name == STREAM and s.kind == CLIENT_KIND)
    assert client_span.attributes["rpc.grpc.status_code"] == 1
