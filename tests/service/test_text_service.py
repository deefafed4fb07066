"""TextGenerationService over a real in-process grpc.aio server with the real SmolLM2."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import aimesh
from aimesh.text.v1 import text_generation_pb2 as pb
from aimesh.text.v1 import text_generation_pb2_grpc as pb_grpc
from aimesh_servers import text
from tests.servers import in_process_server

QUESTION = [("user", "What is the capital of France? Answer in one sentence.")]


@pytest.fixture(scope="module")
async def served():
    servicer = text.build(text.DEFAULT_MODEL, text.ServerSettings())
    async with in_process_server([servicer], max_concurrency=2) as (server, channel):
        client = aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1)
        yield servicer, server, client
        await client.close()


async def test_stream_generate_streams_tokens_with_usage_and_served_by(served):
    _, _, client = served
    pieces = [p async for p in client.text.stream_generate("smollm2-135m", QUESTION, max_tokens=24)]
    assert len(pieces) > 3, "tokens arrive as separate messages"
    text_out = "".join(p.text_delta for p in pieces)
    assert "Paris" in text_out
    last = pieces[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert last.usage.prompt_tokens > 10
    assert last.usage.completion_tokens == len(pieces) or last.usage.completion_tokens > 3
    assert pieces[0].served_by.model == "smollm2-135m" and last.served_by.pool == "local"


async def test_generate_matches_stream_and_respects_max_tokens(served):
    _, _, client = served
    whole = await client.text.generate("smollm2-135m", QUESTION, max_tokens=24)
    streamed = "".join([p.text_delta async for p in
                        client.text.stream_generate("smollm2-135m", QUESTION, max_tokens=24)])
    assert whole.text == streamed  # greedy decoding is deterministic
    short = await client.text.generate("smollm2-135m", QUESTION, max_tokens=3)
    assert short.finish_reason == pb.FINISH_REASON_LENGTH
    assert short.usage.completion_tokens == 3


async def test_stop_sequence_ends_the_answer_before_it(served):
    _, _, client = served
    out = await client.text.generate("smollm2-135m", [("user", "Count from 1 to 10, one number per line.")],
                                     max_tokens=60, stop=["5"])
    assert out.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert "4" in out.text and "5" not in out.text


async def test_seeded_sampling_repeats(served):
    _, _, client = served
    kwargs = dict(max_tokens=16, temperature=1.2, top_p=0.95, seed=7)
    first = await client.text.generate("smollm2-135m", [("user", "Tell me a word.")], **kwargs)
    second = await client.text.generate("smollm2-135m", [("user", "Tell me a word.")], **kwargs)
    assert first.text == second.text


async def test_cancelling_a_stream_stops_the_generation(served):
    servicer, server, client = served
    engine = servicer.engine
    stream = client.text.stream_generate("smollm2-135m", [("user", "Write a very long story about a dragon.")],
                                         max_tokens=1000)
    received = 0
    async for _ in stream:
        received += 1
        if received == 5:
            break
    await stream.aclose()  # cancels the RPC
    # Let the server see the cancellation (the token being computed may still finish),
    # then the count must stay still while ~40 more tokens would have been made.
    before = engine.tokens_generated
    for _ in range(10):
        await asyncio.sleep(1.0)
        if engine.tokens_generated == before:
            break
        before = engine.tokens_generated
    await asyncio.sleep(2.0)
    assert engine.tokens_generated == before, "the model kept generating after the client left"
    assert server.limit.in_flight == 0, "the concurrency slot was not released"


@pytest.mark.parametrize(
    ("kwargs", "code", "field"),
    [
        (dict(messages=[]), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        (dict(messages=[("user", "   ")]), grpc.StatusCode.INVALID_ARGUMENT, "messages[0].content"),
        (dict(messages=QUESTION, max_tokens=0), grpc.StatusCode.OUT_OF_RANGE, "max_tokens"),
        (dict(messages=QUESTION, max_tokens=-5), grpc.StatusCode.OUT_OF_RANGE, "max_tokens"),
        (dict(messages=QUESTION, max_tokens=100_000), grpc.StatusCode.OUT_OF_RANGE, "max_tokens"),
        (dict(messages=QUESTION, temperature=3.0), grpc.StatusCode.OUT_OF_RANGE, "temperature"),
        (dict(messages=QUESTION, top_p=0.0), grpc.StatusCode.OUT_OF_RANGE, "top_p"),
        (dict(messages=QUESTION, stop=["a", "b", "c", "d", "e"]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    ],
)
async def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(served, kwargs, code, field):
    _, server, client = served
    with pytest.raises(aimesh.AimeshError) as caught:
        await client.text.generate("smollm2-135m", **kwargs)
    assert caught.value.code == code
    assert caught.value.reason == "INVALID_FIELD" and caught.value.domain == "aimesh.dev"
    assert caught.value.metadata["field"] == field and field in caught.value.field_violations
    ok = await client.text.generate("smollm2-135m", [("user", "Say hi.")], max_tokens=4)
    assert ok.usage.completion_tokens >= 1
    assert server.limit.in_flight == 0


async def test_unknown_model_is_not_found_listing_what_exists(served):
    _, _, client = served
    with pytest.raises(aimesh.NotFoundError) as caught:
        await client.text.generate("gpt-17", QUESTION)
    assert caught.value.reason == "MODEL_NOT_FOUND"
    assert caught.value.metadata["available"] == "smollm2-135m"
    with pytest.raises(aimesh.NotFoundError):
        await client.text.generate("smollm2-135m", QUESTION, model_version="9")


async def test_undecodable_bytes_are_invalid_argument_not_unknown(served):
    _, server, _ = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        raw = channel.unary_unary("/aimesh.text.v1.TextGenerationService/Generate",
                                  request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(b"\xff\xff\xff\xff", timeout=10)
    error = aimesh.errors.from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "MALFORMED_REQUEST"


async def test_header_and_body_model_must_agree(served):
    _, server, _ = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.TextGenerationServiceStub(channel)
        request = pb.GenerateRequest(model="smollm2-135m", messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request, metadata=[("x-aimesh-model", "other")], timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_full_server_answers_resource_exhausted_with_retry_info(served):
    _, server, client = served
    long = [("user", "Write a long essay about the sea.")]
    streams = [client.text.stream_generate("smollm2-135m", long, max_tokens=400) for _ in range(2)]
    firsts = [await anext(s) for s in streams]  # both slots now busy (max_concurrency=2)
    assert all(f.served_by.model for f in firsts)
    with pytest.raises(aimesh.ResourceExhaustedError) as caught:
        await client.text.generate("smollm2-135m", QUESTION, max_tokens=4)
    assert caught.value.reason == "SERVER_BUSY" and caught.value.retry_after_s and caught.value.retry_after_s > 0
    for s in streams:
        await s.aclose()
    await asyncio.sleep(1.0)
    assert server.limit.in_flight == 0
    ok = await client.text.generate("smollm2-135m", QUESTION, max_tokens=4)
    assert ok.text
