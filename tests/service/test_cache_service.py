"""The response cache over real in-process servers (real embeddings and SmolLM2, real
redis-server): hits and misses, identical bytes, streams, tenants, replicas sharing
Redis, and a Redis that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from aimesh.embedding.v1 import embedding_pb2
from aimesh.text.v1 import text_generation_pb2 as text_pb
from aimesh_servers import embedding, text
from aimesh_servers.runtime import accounting
from aimesh_servers.text.engine import TextEngine
from aimesh_servers.text.servicer import TextGenerationServicer
from aimesh_servers.text.settings import TextSettings

from tests.infra import redis_server
from tests.servers import in_process_server

EMBED = "/aimesh.embedding.v1.EmbeddingService/Embed"
STREAM = "/aimesh.text.v1.TextGenerationService/StreamGenerate"
TIMEOUT = 120


class Accounts:
    """Every call account the servers in this process close (a real usage sink)."""

    def __init__(self) -> None:
        self.ended: list[accounting.CallAccount] = []

    def submit(self, account: accounting.CallAccount) -> None:
        self.ended.append(account)


@pytest.fixture
def accounts():
    sink = Accounts()
    accounting.install_sink(sink)
    yield sink
    accounting.install_sink(None)


async def until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def embedding_server(**settings: object) -> AsyncIterator[tuple[object, grpc.aio.Channel]]:
    servicer = embedding.build(embedding.DEFAULT_MODEL, embedding.ServerSettings())
    async with in_process_server([servicer], cache_enabled=True, **settings) as (server, channel):
        yield server, channel


def embed_bytes(*texts: str) -> bytes:
    return embedding_pb2.EmbedRequest(texts=list(texts), normalize=True).SerializeToString()


async def call(channel: grpc.aio.Channel, method: str, request: bytes, tenant: str = "") -> tuple[bytes, str]:
    """Raw bytes in, raw bytes out (what the wire carried), and the x-aimesh-cache header."""
    metadata = (("x-aimesh-tenant", tenant),) if tenant else ()
    rpc = channel.unary_unary(method)(request, metadata=metadata, timeout=TIMEOUT)
    answer = await rpc
    return answer, dict(await rpc.initial_metadata()).get("x-aimesh-cache", "")


async def stream(channel: grpc.aio.Channel, request: bytes) -> tuple[list[bytes], str]:
    rpc = channel.unary_stream(STREAM)(request, timeout=TIMEOUT)
    messages = [message async for message in rpc]
    return messages, dict(await rpc.initial_metadata()).get("x-aimesh-cache", "")


async def test_a_repeated_embedding_is_a_hit_with_identical_bytes_and_no_slot(accounts):
    async with embedding_server() as (server, channel):
        request = embed_bytes("The same sentence twice.")
        first, state = await call(channel, EMBED, request)
        assert state == "miss"
        # Every slot taken: a miss could not run now, a hit needs none.
        held = [await server.limit.acquire(None) for _ in range(server.limit.slots)]
        try:
            again, state = await call(channel, EMBED, request)
        finally:
            for ticket in held:
                server.limit.release(ticket)
        assert state == "hit" and again == first
        other, state = await call(channel, EMBED, embed_bytes("Another sentence."))
        assert state == "miss" and other != first
        await until(lambda: len(accounts.ended) == 3, "three accounts")
    miss, hit, _ = accounts.ended
    assert not miss.cache_hit and hit.cache_hit and hit.status == "OK"
    response = embedding_pb2.EmbedResponse.FromString(first)
    assert (hit.unit, hit.input_units, hit.output_units) == (
        "tokens", response.usage.input_units, response.usage.output_units) and hit.input_units > 0
    assert hit.served_model == embedding.DEFAULT_MODEL.id and hit.pool == "local"


async def test_entries_never_cross_tenants_unless_the_scope_is_shared():
    request = embed_bytes("Tenant-scoped text.")
    async with embedding_server() as (_, channel):
        assert (await call(channel, EMBED, request, "acme"))[1] == "miss"
        assert (await call(channel, EMBED, request, "globex"))[1] == "miss"
        assert (await call(channel, EMBED, request, "acme"))[1] == "hit"
        assert (await call(channel, EMBED, request, "globex"))[1] == "hit"
    async with embedding_server(cache_scope="shared") as (_, channel):
        first, state = await call(channel, EMBED, request, "acme")
        again, shared_state = await call(channel, EMBED, request, "globex")
        assert (state, shared_state) == ("miss", "hit") and again == first


async def test_bad_input_is_refused_and_never_cached():
    async with embedding_server() as (server, channel):
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(channel, EMBED, embed_bytes(""))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, EMBED, b"\xff\xff not a message")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert server.limit.in_flight == 0 and len(server.cache.backend) == 0


async def test_replicas_sharing_redis_share_hits(redis_url):
    request = embed_bytes("Shared across replicas.")
    settings = {"cache_url": redis_url, "cache_prefix": "test-replicas:"}
    async with embedding_server(**settings) as (_, first_channel), \
            embedding_server(**settings) as (_, second_channel):
        first, state = await call(first_channel, EMBED, request)
        again, other_state = await call(second_channel, EMBED, request)
    assert (state, other_state) == ("miss", "hit") and again == first


async def test_a_redis_that_goes_away_degrades_to_misses():
    request = embed_bytes("Redis comes and goes.")
    with contextlib.ExitStack() as redis:
        url = redis.enter_context(redis_server())
        async with embedding_server(cache_url=url) as (server, channel):
            first, state = await call(channel, EMBED, request)
            assert state == "miss" and (await call(channel, EMBED, request))[1] == "hit"
            redis.close()  # the redis-server process stops; the model server lives on
            for _ in range(3):
                answer, state = await call(channel, EMBED, request)
                assert state == "miss" and answer == first
            assert server.limit.in_flight == 0


@contextlib.asynccontextmanager
async def text_server(**settings: object) -> AsyncIterator[tuple[object, grpc.aio.Channel]]:
    # One torch thread: two spin-waiting OpenMP threads slow a loaded test machine down.
    engine = TextEngine(text.DEFAULT_MODEL.source, threads=1, settings=TextSettings(max_batch=4))
    servicer = TextGenerationServicer(text.DEFAULT_MODEL, engine, "local")
    try:
        async with in_process_server([servicer], cache_enabled=True, **settings) as (server, channel):
            yield server, channel
    finally:
        engine.close()


def chat(**fields: object) -> bytes:
    return text_pb.StreamGenerateRequest(
        messages=[text_pb.ChatMessage(role=text_pb.ROLE_USER, content="Name three colours.")],
        **fields).SerializeToString()


@pytest.fixture(scope="module")
async def texts():
    async with text_server() as parts:
        yield parts


async def test_a_greedy_stream_hit_streams_the_same_messages(texts):
    _, channel = texts
    request = chat(max_tokens=12)
    first, state = await stream(channel, request)
    again, hit = await stream(channel, request)
    assert (state, hit) == ("miss", "hit")
    assert len(first) > 3 and again == first  # still a stream: the same messages, one by one
    seeded = chat(max_tokens=6, temperature=0.9, seed=11)
    assert (await stream(channel, seeded))[1] == "miss" and (await stream(channel, seeded))[1] == "hit"


async def test_a_sampled_request_is_never_cached(texts, accounts):
    _, channel = texts
    sampled = chat(max_tokens=6, temperature=0.9)
    for _ in range(2):
        _, state = await stream(channel, sampled)
        assert state == ""  # the cache does not apply: no header
    await until(lambda: len(accounts.ended) == 2, "two accounts")
    assert not any(account.cache_hit for account in accounts.ended)


async def test_a_cancelled_stream_is_not_stored(texts):
    server, channel = texts
    request = chat(max_tokens=40, stop=["never-appears"])
    rpc = channel.unary_stream(STREAM)(request, timeout=TIMEOUT)
    await asyncio.wait_for(anext(aiter(rpc)), TIMEOUT)
    rpc.cancel()
    await until(lambda: server.limit.in_flight == 0, "the cancelled call left its slot")
    _, state = await stream(channel, request)
    assert state == "miss"
