"""The response cache's pure parts: which requests are deterministic, the key, the
stored-answer format and the memory backend's TTL and bounds."""

from __future__ import annotations

import pytest
from aimesh.embedding.v1 import embedding_pb2
from aimesh.image.v1 import image_generation_pb2
from aimesh.speech.v1 import speech_to_text_pb2
from aimesh.text.v1 import text_generation_pb2 as text_pb
from aimesh_servers.runtime.cache import CachedAnswer, MemoryBackend, Recording, ResponseCache
from aimesh_servers.runtime.service import ServedModel

GENERATE = "/aimesh.text.v1.TextGenerationService/Generate"
EMBED = "/aimesh.embedding.v1.EmbeddingService/Embed"
IMAGE = "/aimesh.image.v1.ImageGenerationService/GenerateImage"
MODELS = [ServedModel(id="chat", source="x", version="3", aliases=("chat-latest",))]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cache(scope: str = "tenant", models=MODELS) -> ResponseCache:
    return ResponseCache(MemoryBackend(100, 1 << 20), models, ttl_s=60, scope=scope)


def chat(**fields) -> text_pb.GenerateRequest:
    return text_pb.GenerateRequest(messages=[text_pb.ChatMessage(role=text_pb.ROLE_USER, content="hi")], **fields)


@pytest.mark.parametrize(("method", "request_", "cacheable"), [
    (GENERATE, chat(), True),  # temperature unset: greedy
    (GENERATE, chat(temperature=0.0), True),
    (GENERATE, chat(temperature=0.7), False),
    (GENERATE, chat(temperature=0.7, seed=5), True),
    (EMBED, embedding_pb2.EmbedRequest(texts=["a"]), True),
    (IMAGE, image_generation_pb2.GenerateImageRequest(prompt="p"), False),  # the engine draws a seed
    (IMAGE, image_generation_pb2.GenerateImageRequest(prompt="p", seed=0), True),
    ("/aimesh.speech.v1.SpeechToTextService/Recognize", speech_to_text_pb2.RecognizeRequest(audio=b"x"), False),
])
def test_only_deterministic_requests_get_a_key(method, request_, cacheable):
    assert (cache().key(method, request_, {}) is not None) == cacheable


def test_the_key_separates_tenants_models_methods_and_requests():
    tenant = cache("tenant")
    key = tenant.key(GENERATE, chat(max_tokens=8), {"x-aimesh-tenant": "a"})
    assert key is not None and key[1] == MODELS[0]
    assert tenant.key(GENERATE, chat(max_tokens=8), {"x-aimesh-tenant": "a"}) == key
    others = [
        tenant.key(GENERATE, chat(max_tokens=8), {"x-aimesh-tenant": "b"}),
        tenant.key(GENERATE, chat(max_tokens=9), {"x-aimesh-tenant": "a"}),
        tenant.key("/aimesh.text.v1.TextGenerationService/StreamGenerate", chat(max_tokens=8),
                   {"x-aimesh-tenant": "a"}),
        tenant.key(GENERATE, chat(max_tokens=8, model="chat-latest"), {"x-aimesh-tenant": "a"}),
        cache("tenant", [ServedModel(id="chat", source="x", version="4")]).key(
            GENERATE, chat(max_tokens=8), {"x-aimesh-tenant": "a"}),
    ]
    assert len({k[0] for k in [key, *others]}) == 6
    shared = cache("shared")
    assert (shared.key(GENERATE, chat(), {"x-aimesh-tenant": "a"})[0]
            == shared.key(GENERATE, chat(), {"x-aimesh-tenant": "b"})[0])


def test_the_model_in_the_body_or_the_routing_header_counts_the_same():
    c = cache()
    by_body = c.key(GENERATE, chat(model="chat"), {})
    by_header = c.key(GENERATE, chat(), {"x-aimesh-model": "chat"})
    assert by_body is not None and by_header is not None
    # The request bytes differ (the body names the model), so do the keys; both are valid.
    assert by_body[2] == by_header[2] == "chat"


def test_a_request_this_server_cannot_answer_is_not_cacheable():
    c = cache()
    assert c.key(GENERATE, chat(model="other"), {}) is None
    assert c.key(GENERATE, chat(model="chat", model_version="9"), {}) is None
    assert c.key(GENERATE, chat(model="chat"), {"x-aimesh-model": "chat-latest"}) is None


def test_the_key_is_canonical_for_equal_messages():
    a = embedding_pb2.EmbedRequest(texts=["x", "y"], normalize=True)
    b = embedding_pb2.EmbedRequest()
    b.normalize = True
    b.texts.extend(["x", "y"])
    assert cache().key(EMBED, a, {}) == cache().key(EMBED, b, {})


def test_a_stored_answer_round_trips():
    answer = CachedAnswer((b"", b"\x00one", b"two" * 1000), "tokens", 12.0, 3.5)
    assert CachedAnswer.decode(answer.encode()) == answer
    assert CachedAnswer.decode(CachedAnswer(()).encode()).messages == ()


async def test_memory_entries_expire_after_their_ttl():
    clock = Clock()
    backend = MemoryBackend(10, 1000, clock=clock)
    await backend.set("k", b"v", ttl_s=5)
    clock.now = 4.9
    assert await backend.get("k") == b"v"
    clock.now = 5.0
    assert await backend.get("k") is None and len(backend) == 0 and backend.bytes == 0


async def test_memory_is_bounded_by_entries_least_recently_used_first():
    backend = MemoryBackend(2, 1000)
    await backend.set("a", b"1", 60)
    await backend.set("b", b"2", 60)
    assert await backend.get("a") == b"1"  # a is now the most recently used
    await backend.set("c", b"3", 60)
    assert await backend.get("b") is None
    assert await backend.get("a") == b"1" and await backend.get("c") == b"3"


async def test_memory_is_bounded_by_bytes():
    backend = MemoryBackend(100, 10)
    await backend.set("a", b"x" * 4, 60)
    await backend.set("b", b"y" * 4, 60)
    await backend.set("c", b"z" * 4, 60)
    assert backend.bytes <= 10 and await backend.get("a") is None
    await backend.set("huge", b"h" * 11, 60)  # larger than the whole cache: never stored
    assert await backend.get("huge") is None and await backend.get("c") == b"z" * 4
    await backend.set("c", b"w", 60)  # replacing counts the new size only
    assert backend.bytes == 5


def test_a_recording_too_large_is_dropped():
    recording = Recording(limit=5)
    recording.add(b"abc")
    assert recording.complete and recording.messages == [b"abc"]
    recording.add(b"def")
    recording.add(b"g")
    assert not recording.complete and recording.messages == []
