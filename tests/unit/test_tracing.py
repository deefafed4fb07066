"""Server spans over a real in-process gRPC server (the real all-MiniLM-L6-v2 embedding
model; the tiny random-weight SD with one slot) exporting to a real OTLP/gRPC receiver,
and the SDK's client span around the call."""

from __future__ import annotations

import asyncio

import aimesh
import grpc
import pytest
from aimesh.client.tracing import traced
from aimesh_servers import embedding
from aimesh_servers.runtime import tracing
from opentelemetry import trace
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.otlp_receiver import OtlpReceiver, caller_tracing, running_receiver
from tests.servers import in_process_server
from tests.service.test_admission import QUICK, hog, image_server, until

MODEL = embedding.DEFAULT_MODEL.id
SERVER = trace_pb2.Span.SpanKind.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SpanKind.SPAN_KIND_CLIENT


@pytest.fixture(scope="module")
def receiver():
    yield from running_receiver()


def test_stages_outside_a_traced_call_are_shared_no_ops():
    assert tracing.stage("embedding.batch", texts=1) is tracing.stage("image.diffusion")
    assert tracing.stages() is tracing.stages()
    with tracing.stage("x") as stage:
        stage.set(anything=1)


async def test_a_call_continues_the_callers_trace_with_its_model_work(receiver: OtlpReceiver):
    servicer = embedding.build(embedding.DEFAULT_MODEL, embedding.ServerSettings())
    with caller_tracing(receiver.endpoint) as processor:
        async with in_process_server([servicer], otlp_endpoint=receiver.endpoint) as (server, _):
            async with aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
                with trace.get_tracer("test").start_as_current_span("caller") as caller:
                    await client.embedding.embed(MODEL, ["A man is eating food."])
                trace_id = format(caller.get_span_context().trace_id, "032x")
        processor.force_flush()  # the server flushed its spans when it drained
    spans = receiver.wait_for(lambda got: len(got) >= 4, "caller, client, server and model work spans",
                              trace_id=trace_id)
    by_name = {s.name: s for s in spans}
    client_span = by_name["aimesh.embedding.v1.EmbeddingService/Embed"]
    server_span = next(s for s in spans if s.kind == SERVER)
    assert client_span.kind == CLIENT and client_span.parent_id == by_name["caller"].span_id
    assert server_span.parent_id == client_span.span_id and server_span.service == "aimesh-server"
    assert server_span.attributes["rpc.system"] == "grpc"
    assert server_span.attributes["rpc.method"] == "Embed"
    assert server_span.attributes["rpc.grpc.status_code"] == 0
    assert server_span.attributes["aimesh.model"] == MODEL
    # What is the same for every call of a server is on its resource, sent once per batch.
    assert server_span.resource["aimesh.pool"] == "local"
    assert server_span.resource["aimesh.replica"] == f"127.0.0.1:{server.port}"
    assert server_span.attributes["aimesh.units.unit"] == "tokens"
    assert server_span.attributes["aimesh.units.input"] > 0
    assert server_span.attributes["aimesh.finish_reason"] == "complete"
    # Admitted at once, one answer message: the model work is the only child span.
    assert [s.name for s in spans if s.parent_id == server_span.span_id] == ["embedding.batch"]
    assert by_name["embedding.batch"].attributes["aimesh.texts"] == 1
    assert client_span.attributes["rpc.grpc.status_code"] == 0


async def read_all(call) -> list:
    return [message async for message in call]


async def test_a_queued_call_has_an_admission_span_and_a_cancelled_stream_a_cancelled_span(receiver):
    async with image_server(otlp_endpoint=receiver.endpoint, max_queue=4, queue_timeout_s=120) as (server, stub):
        async with hog(stub, server):  # holds the only slot with a stream cancelled at the end
            queued = asyncio.ensure_future(read_all(stub.GenerateImage(QUICK, timeout=300)))
            await until(lambda: server.limit.waiting == 1, "the second call queued")
        await asyncio.wait_for(queued, 120)
    spans = receiver.wait_for(
        lambda got: any(s.name == "aimesh.admission" for s in got)
        and sum(s.kind == SERVER and s.name.endswith("/GenerateImage") for s in got) >= 2,
        "the queued call's admission span and both server spans")
    admission = next(s for s in spans if s.name == "aimesh.admission")
    assert admission.attributes["aimesh.queue.depth"] == 1 and admission.attributes["aimesh.queue.wait_ms"] > 0
    queued_call = next(s for s in spans if s.span_id == admission.parent_id)
    assert queued_call.attributes["rpc.grpc.status_code"] == 0
    stages = {s.name: s for s in spans if s.parent_id == queued_call.span_id}
    assert {"aimesh.admission", "image.diffusion", "aimesh.result"} == set(stages)
    assert stages["image.diffusion"].attributes["aimesh.total_steps"] == QUICK.steps
    hog_call = next(s for s in spans if s.kind == SERVER and s.attributes["rpc.grpc.status_code"] == 1)
    assert hog_call.attributes["aimesh.finish_reason"] == "cancelled"
    diffusion = next(s for s in spans if s.parent_id == hog_call.span_id and s.name == "image.diffusion")
    assert diffusion.attributes["aimesh.cancelled"] is True


class _PassThrough(grpc.UnaryUnaryClientInterceptor):
    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(client_call_details, request)


def test_the_sdk_names_the_client_span_of_a_call_behind_a_client_interceptor(receiver: OtlpReceiver):
    """grpc.intercept_channel keeps the method name as str, plain stubs as bytes."""
    with caller_tracing(receiver.endpoint), grpc.insecure_channel("127.0.0.1:1") as channel:
        method = grpc.intercept_channel(channel, _PassThrough()).unary_unary("/aimesh.test.v1.Svc/Call")
        with traced(method) as metadata:
            assert [key for key, _ in metadata] == ["traceparent"]
