"""Exact-match response cache for deterministic requests.

The interceptor asks `ResponseCache.lookup` before it admits a call: a request the
cache may answer gets a key, and a stored answer (a hit) is replayed without taking an
engine slot. A miss runs as usual and its answer is stored once the call ended OK; a
server stream is stored as its list of messages, so a hit still streams.

What is deterministic, per method (`DETERMINISTIC`):
- text Generate / StreamGenerate: greedy (temperature unset or 0) or a fixed `seed`
  (the scheduler gives a seeded call a generator of its own, so it repeats in a batch);
- embeddings Embed: always;
- speech Synthesize: always (same text, voice, speed, format). Piper's VITS draws noise
  (`noise_scale`), so two syntheses differ in their samples, not in what they say: a hit
  returns the first rendition;
- vision DescribeImage: always (tesseract OCR, greedy captions);
- image GenerateImage / TransformImage: only with a fixed `seed` (without one the
  engine draws one).
Never cached: speech-to-text (Whisper falls back to sampling at higher temperatures when
a window decodes badly; StreamingRecognize is a client stream) and ListVoices (cheap).

The key is sha256 over the model id and version, the full method name, the model name
asked for (it is echoed in `served_by`), the tenant (unless the policy's scope is
`shared`) and the request's deterministic protobuf serialization. Entries live in this
process's memory (LRU bounded by entries and bytes, TTL) or in Redis (shared by every
replica: SET with EX under a key prefix). A Redis that fails is a miss, never a failed
call; after a failure the cache skips Redis for `REDIS_RETRY_S`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .accounting import MODEL_HEADER, TENANT_HEADER
from .errors import AimeshError
from .service import ServedModel, resolve_model

log = logging.getLogger(__name__)

CACHE_HEADER = "x-aimesh-cache"
REDIS_RETRY_S = 1.0


def _always(_: Any) -> bool:
    return True


def _seeded(request: Any) -> bool:
    return request.HasField("seed")


def _greedy_or_seeded(request: Any) -> bool:
    greedy = not request.HasField("temperature") or request.temperature == 0
    return greedy or request.HasField("seed")


DETERMINISTIC: dict[str, Callable[[Any], bool]] = {
    "/aimesh.text.v1.TextGenerationService/Generate": _greedy_or_seeded,
    "/aimesh.text.v1.TextGenerationService/StreamGenerate": _greedy_or_seeded,
    "/aimesh.embedding.v1.EmbeddingService/Embed": _always,
    "/aimesh.speech.v1.TextToSpeechService/Synthesize": _always,
    "/aimesh.vision.v1.ImageToTextService/DescribeImage": _always,
    "/aimesh.image.v1.ImageGenerationService/GenerateImage": _seeded,
    "/aimesh.image.v1.ImageGenerationService/TransformImage": _seeded,
}


@dataclass(frozen=True)
class CachedAnswer:
    """The serialized response messages of one call (one for a unary call) and its units."""

    messages: tuple[bytes, ...]
    unit: str = ""
    input_units: float = 0.0
    output_units: float = 0.0

    def encode(self) -> bytes:
        header = json.dumps([self.unit, self.input_units, self.output_units]).encode()
        return b"".join(struct.pack(">I", len(part)) + part for part in (header, *self.messages))

    @classmethod
    def decode(cls, blob: bytes) -> CachedAnswer:
        parts, offset = [], 0
        while offset < len(blob):
            (size,) = struct.unpack_from(">I", blob, offset)
            parts.append(blob[offset + 4:offset + 4 + size])
            offset += 4 + size
        unit, input_units, output_units = json.loads(parts[0])
        return cls(tuple(parts[1:]), unit, input_units, output_units)

    @property
    def size(self) -> int:
        return sum(len(m) for m in self.messages)


class CacheBackend(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, blob: bytes, ttl_s: float) -> None: ...

    async def close(self) -> None: ...


class MemoryBackend:
    """An LRU in this process, bounded by entries and bytes; entries expire after their TTL."""

    def __init__(self, max_entries: int, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, blob = entry
        if self._clock() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return blob

    async def set(self, key: str, blob: bytes, ttl_s: float) -> None:
        if len(blob) > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + ttl_s, blob)
        self.bytes += len(blob)
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))  # least recently used first

    def _drop(self, key: str) -> None:
        _, blob = self._entries.pop(key)
        self.bytes -= len(blob)

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0


class RedisBackend:
    """Entries in Redis under `prefix`, shared by every replica that uses the same URL."""

    def __init__(self, url: str, prefix: str, timeout_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        import redis.asyncio
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors = (redis.exceptions.RedisError, OSError)
        # No retries: a cache that cannot answer at once is a miss.
        self._client = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self.prefix = prefix
        self._clock = clock
        self._skip_until = 0.0

    async def get(self, key: str) -> bytes | None:
        if self._clock() < self._skip_until:
            return None
        try:
            blob = await self._client.get(self.prefix + key)
        except self._errors as exc:
            self._failed(exc)
            return None
        self._recovered()
        return blob

    async def set(self, key: str, blob: bytes, ttl_s: float) -> None:
        if self._clock() < self._skip_until:
            return
        try:
            await self._client.set(self.prefix + key, blob, ex=max(1, round(ttl_s)))
        except self._errors as exc:
            self._failed(exc)
            return
        self._recovered()

    def _failed(self, exc: BaseException) -> None:
        if not self._skip_until:
            log.warning("response cache: redis unavailable (%s); answering without it", exc)
        self._skip_until = self._clock() + REDIS_RETRY_S

    def _recovered(self) -> None:
        if self._skip_until:
            log.warning("response cache: redis is back")
            self._skip_until = 0.0

    async def close(self) -> None:
        await self._client.aclose()


@dataclass(frozen=True)
class Lookup:
    """A cacheable call: its decoded request, its key, the model and name asked for, and
    the stored answer if there was one."""

    request: Any
    key: str
    model: ServedModel
    asked: str
    answer: CachedAnswer | None


class Recording:
    """The serialized messages of a missed stream, kept while they fit in `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.messages: list[bytes] = []
        self.size = 0
        self.complete = True  # False once it outgrew the limit: then nothing is stored

    def add(self, message: bytes) -> None:
        if not self.complete:
            return
        self.size += len(message)
        if self.size > self.limit:
            self.complete = False
            self.messages.clear()
        else:
            self.messages.append(message)


class ResponseCache:
    def __init__(self, backend: CacheBackend, models: Sequence[ServedModel], *, ttl_s: float,
                 scope: str = "tenant", pool: str = "local",
                 max_entry_bytes: int = 16 * 1024 * 1024) -> None:
        if scope not in ("tenant", "shared"):
            raise ValueError(f"cache scope must be tenant or shared, got {scope!r}")
        self.backend = backend
        self.models = list(models)
        self.pool = pool  # named in the served_by headers of a hit
        self.ttl_s = ttl_s
        self.scope = scope
        self.max_entry_bytes = max_entry_bytes
        self.hits = 0
        self.misses = 0

    def key(self, method: str, request: Any, metadata: dict[str, str]) -> tuple[str, ServedModel, str] | None:
        """The request's key, model and asked name, or None when it is not cacheable (not
        deterministic, or a model this server does not serve: the servicer answers that)."""
        rule = DETERMINISTIC.get(method)
        if rule is None or not rule(request):
            return None
        header = metadata.get(MODEL_HEADER, "")
        if request.model and header and request.model != header:
            return None
        asked = request.model or header
        try:
            model = resolve_model(self.models, asked, request.model_version)
        except AimeshError:
            return None
        tenant = metadata.get(TENANT_HEADER, "") if self.scope == "tenant" else ""
        digest = hashlib.sha256()
        for part in (model.id, model.version, method, asked, tenant):
            encoded = part.encode()
            digest.update(struct.pack(">I", len(encoded)) + encoded)
        digest.update(request.SerializeToString(deterministic=True))
        return digest.hexdigest(), model, asked

    async def lookup(self, method: str, request: Any, metadata: dict[str, str]) -> Lookup | None:
        keyed = self.key(method, request, metadata)
        if keyed is None:
            return None
        key, model, asked = keyed
        blob = await self.backend.get(key)
        answer = None
        if blob is not None:
            try:
                answer = CachedAnswer.decode(blob)
            except (struct.error, ValueError, IndexError):
                log.warning("response cache: entry %s does not decode; treated as a miss", key)
        if answer is None:
            self.misses += 1
        else:
            self.hits += 1
        return Lookup(request, key, model, asked, answer)

    async def store(self, key: str, answer: CachedAnswer) -> None:
        if answer.size <= self.max_entry_bytes:
            await self.backend.set(key, answer.encode(), self.ttl_s)

    async def close(self) -> None:
        await self.backend.close()


def build_cache(settings: Any, models: Sequence[ServedModel]) -> ResponseCache | None:
    """The server's cache from its settings (`cache_*`), or None when caching is off."""
    if not settings.cache_enabled:
        return None
    backend: CacheBackend = (
        RedisBackend(settings.cache_url, settings.cache_prefix) if settings.cache_url
        else MemoryBackend(settings.cache_max_entries, settings.cache_max_bytes))
    return ResponseCache(backend, models, ttl_s=settings.cache_ttl_s, scope=settings.cache_scope,
                         pool=settings.pool, max_entry_bytes=settings.cache_max_entry_bytes)
