"""EmbeddingService over a real in-process grpc.aio server with the real
all-MiniLM-L6-v2, through the SDK (async and sync)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

import aimesh
from aimesh.client.embedding import vectors
from aimesh_servers import embedding
from aimesh_servers.embedding.engine import EmbedRequest
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
