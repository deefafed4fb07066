"""EmbeddingService over a real in-process grpc.aio server with the real
all-MiniLM-L6-v2, through the SDK (async and sync), alone and with concurrent callers
sharing batches."""

from __future__ import annotations

import asyncio

import aimesh
import grpc
import numpy as np
import pytest
from aimesh.client.embedding import vectors
from aimesh.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from aimesh_servers import embedding
from aimesh_servers.embedding.engine import EmbeddingEngine, EmbedRequest
from aimesh_servers.embedding.servicer import EmbeddingServicer
from aimesh_servers.runtime.batching import BatchSettings

from tests.servers import in_process_server

MODEL = embedding.DEFAULT_MODEL.id
RELATED = ["A man is eating food.", "A man is eating a piece of bread."]
UNRELATED = "The stock market fell sharply on Tuesday."


@pytest.fixture(scope="module")
async def served():
    servicer = embedding.build(embedding.DEFAULT_MODEL, embedding.ServerSettings())
    async with in_process_server([servicer], max_concurrency=2) as (server, channel):
        client = aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1)
        yield servicer, server, client
        await client.close()


async def test_related_texts_are_closer_and_normalize_gives_unit_vectors(served):
    servicer, _, client = served
    out = await client.embedding.embed(MODEL, [*RELATED, UNRELATED], normalize=True)
    v = np.array(vectors(out), dtype=np.float32)
    assert out.dimensions == 384 and v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.6 and max(v[0] @ v[2], v[1] @ v[2]) < 0.2
    tokens = sum(len(servicer.engine.tokenizer(t)["input_ids"]) for t in [*RELATED, UNRELATED])
    assert out.usage.unit == "tokens" and out.usage.input_units == tokens
    assert out.served_by.model == MODEL and not out.served_by.random_weights


async def test_vectors_match_the_engine_and_the_sync_client(served):
    servicer, server, _ = served
    direct = servicer.engine.embed(EmbedRequest(RELATED)).vectors

    def call():
        with aimesh.Client(f"127.0.0.1:{server.port}", max_attempts=1) as client:
            return client.embedding.embed(MODEL, RELATED)

    out = await asyncio.to_thread(call)
    np.testing.assert_allclose(np.array(vectors(out)), direct, atol=1e-6)
    assert not np.allclose(np.linalg.norm(direct, axis=1), 1.0, atol=1e-3)


@pytest.mark.parametrize(("texts", "code", "field"), [
    ([], grpc.StatusCode.INVALID_ARGUMENT, "texts"),
    ([""], grpc.StatusCode.INVALID_ARGUMENT, "texts[0]"),
    (["fine", "   "], grpc.StatusCode.INVALID_ARGUMENT, "texts[1]"),
    (["t"] * 129, grpc.StatusCode.OUT_OF_RANGE, "texts"),
    (["ok", "word " * 300], grpc.StatusCode.OUT_OF_RANGE, "texts[1]"),
    (["x" * 40_000], grpc.StatusCode.OUT_OF_RANGE, "texts[0]"),
])
async def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(served, texts, code, field):
    _, server, client = served
    with pytest.raises(aimesh.AimeshError) as caught:
        await client.embedding.embed(MODEL, texts)
    assert caught.value.code == code
    assert caught.value.reason == "INVALID_FIELD" and caught.value.domain == "aimesh.dev"
    assert caught.value.metadata["field"] == field and field in caught.value.field_violations
    ok = await client.embedding.embed(MODEL, ["still serving"])
    assert len(ok.embeddings) == 1 and len(ok.embeddings[0].values) == 384
    assert server.limit.in_flight == 0


async def test_unknown_model_and_version_are_not_found(served):
    _, _, client = served
    with pytest.raises(aimesh.NotFoundError) as caught:
        await client.embedding.embed("text-embedding-9", RELATED)
    assert caught.value.metadata["available"] == MODEL
    with pytest.raises(aimesh.NotFoundError):
        await client.embedding.embed(MODEL, RELATED, model_version="7")


def test_sdk_refuses_a_lone_string():
    with aimesh.Client("127.0.0.1:1", max_attempts=1) as client:
        with pytest.raises(TypeError):
            client.embedding.embed(MODEL, "one string")


async def test_a_call_past_its_deadline_frees_its_slot(served):
    _, server, client = served
    texts = [f"sentence number {i} " + "about the weather and the sea " * 5 for i in range(128)]
    with pytest.raises(aimesh.DeadlineExceededError):
        await client.embedding.embed(MODEL, texts, timeout=0.05)
    for _ in range(100):  # the worker stops after its current micro-batch
        if server.limit.in_flight == 0:
            break
        await asyncio.sleep(0.1)
    assert server.limit.in_flight == 0
    ok = await client.embedding.embed(MODEL, ["still serving"])
    assert len(ok.embeddings) == 1


# Dynamic batching: a server whose batches hold 16 texts, and which waits long for a
# batch to fill, so that concurrent callers surely share one and a lone call surely waits.
BATCH = 16


@pytest.fixture(scope="module")
async def batched():
    engine = EmbeddingEngine(embedding.DEFAULT_MODEL.source,
                             batching=BatchSettings(max_items=BATCH, max_wait_ms=10_000))
    servicer = EmbeddingServicer(embedding.DEFAULT_MODEL, engine, "local")
    async with in_process_server([servicer]) as (server, _):  # slots: engine.capacity
        client = aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1)
        yield engine, server, client
        await client.close()
    engine.batcher.close()


def caller_texts(n: int) -> list[str]:
    """A different text of a different length for each caller: batches pad and reorder."""
    return [f"caller {i} asks about " + " ".join(["the weather", "ships", "bread and cheese"][i % 3:]) * (1 + i % 5)
            for i in range(n)]


async def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_concurrent_callers_share_batches_and_each_gets_its_own_vectors(batched):
    engine, server, client = batched
    texts = caller_texts(BATCH)
    alone = [engine.embed(EmbedRequest([t], normalize=i % 2 == 0)).vectors[0] for i, t in enumerate(texts)]
    before = engine.batcher.stats.batches
    outs = await asyncio.gather(*(client.embedding.embed(MODEL, [t], normalize=i % 2 == 0)
                                  for i, t in enumerate(texts)))
    for i, out in enumerate(outs):
        np.testing.assert_allclose(np.array(vectors(out))[0], alone[i], atol=1e-5, err_msg=f"caller {i}")
        assert out.usage.input_units == len(engine.tokenizer(texts[i])["input_ids"])
    ran = engine.batcher.stats.batches - before
    assert ran < BATCH and engine.batcher.stats.largest > 1, f"{BATCH} calls ran in {ran} batches"
    assert server.limit.in_flight == 0


async def test_a_text_too_long_fails_only_its_caller(batched):
    engine, server, client = batched
    texts = caller_texts(BATCH)
    texts[5] = "word " * 300  # passes the cheap checks; 302 tokens fail in the batch
    before = engine.batcher.stats.calls
    outs = await asyncio.gather(*(client.embedding.embed(MODEL, [t]) for t in texts), return_exceptions=True)
    assert isinstance(outs[5], aimesh.AimeshError) and outs[5].code == grpc.StatusCode.OUT_OF_RANGE
    assert outs[5].metadata["field"] == "texts[0]"
    for i, out in enumerate(outs):
        if i != 5:
            assert not isinstance(out, BaseException), (i, out)
            np.testing.assert_allclose(np.array(vectors(out))[0], engine.embed(EmbedRequest([texts[i]])).vectors[0],
                                       atol=1e-5)
    assert engine.batcher.stats.calls - before == BATCH
    assert server.limit.in_flight == 0


async def test_a_cancelled_call_is_dropped_before_its_batch_runs(batched):
    engine, server, _ = batched
    before = engine.batcher.stats
    dropped, batches = before.dropped, before.batches
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(
            embedding_pb2.EmbedRequest(model=MODEL, texts=["never embedded"]), timeout=60)
        await wait_for(lambda: engine.batcher.waiting == 1, "the call to wait for its batch")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_for(lambda: server.limit.in_flight == 0, "the slot to be released")
    await wait_for(lambda: engine.batcher.waiting == 0, "the cancelled call to leave the queue")
    assert engine.batcher.stats.dropped == dropped + 1 and engine.batcher.stats.batches == batches
