"""`aimesh.Client` and `aimesh.AsyncClient`: one channel to the mesh, a typed
sub-client per capability (client.text, client.image, ...)."""

from __future__ import annotations

import os
from types import TracebackType

import grpc

from .embedding import AsyncEmbeddingClient, EmbeddingClient
from .image import AsyncImageClient, ImageClient
from .jobs import AsyncJobsClient, JobsClient
from .registry import AsyncRegistryClient, RegistryClient
from .speech import (
    AsyncSpeechToTextClient,
    AsyncTextToSpeechClient,
    SpeechToTextClient,
    TextToSpeechClient,
)
from .tenancy import AsyncTenantsClient, TenantsClient
from .text import AsyncTextClient, TextClient
from .transport import DEFAULT_TIMEOUT_S, MAX_ATTEMPTS, AsyncTransport, Transport, channel_options
from .usage import AsyncUsageClient, UsageClient
from .vision import AsyncVisionClient, VisionClient


def _token(token: str | None) -> str | None:
    return os.environ.get("AIMESH_TOKEN") if token is None else token or None


class Client:
    """Blocking client. `with aimesh.Client("localhost:8080", token=...) as client:`

    target: host:port of the mesh front door (Envoy) or of one server.
    token: the tenant's JWT, sent as `authorization: Bearer ...`; None reads the
        AIMESH_TOKEN environment variable, "" sends none.
    timeout: default deadline in seconds for every call (each call can override it).
    max_attempts: attempts per call (1 = no retry, at most 2) for calls that fail UNAVAILABLE,
        or RESOURCE_EXHAUSTED from a busy server, before any response.
    retry_busy: retry a busy server's RESOURCE_EXHAUSTED after the delay it asks for.
    """

    def __init__(self, target: str = "localhost:8080", *, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, max_attempts: int = MAX_ATTEMPTS,
                 retry_busy: bool = True, credentials: grpc.ChannelCredentials | None = None) -> None:
        options = channel_options(max_attempts, retry_busy)
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        transport = Transport(self.channel, _token(token), timeout)
        self.registry = RegistryClient(transport)
        self.text = TextClient(transport)
        self.vision = VisionClient(transport)
        self.embedding = EmbeddingClient(transport)
        self.image = ImageClient(transport)
        self.stt = SpeechToTextClient(transport)
        self.tts = TextToSpeechClient(transport)
        self.tenants = TenantsClient(transport)  # admin scope
        self.usage = UsageClient(transport)
        self.jobs = JobsClient(transport)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """Async client. `async with aimesh.AsyncClient("localhost:8080") as client:`
    Same arguments and sub-clients as Client, with awaitable calls and async iterators."""

    def __init__(self, target: str = "localhost:8080", *, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, max_attempts: int = MAX_ATTEMPTS,
                 retry_busy: bool = True, credentials: grpc.ChannelCredentials | None = None) -> None:
        options = channel_options(max_attempts, retry_busy)
        self.channel = (grpc.aio.secure_channel(target, credentials, options) if credentials
                        else grpc.aio.insecure_channel(target, options))
        transport = AsyncTransport(self.channel, _token(token), timeout)
        self.registry = AsyncRegistryClient(transport)
        self.text = AsyncTextClient(transport)
        self.vision = AsyncVisionClient(transport)
        self.embedding = AsyncEmbeddingClient(transport)
        self.image = AsyncImageClient(transport)
        self.stt = AsyncSpeechToTextClient(transport)
        self.tts = AsyncTextToSpeechClient(transport)
        self.tenants = AsyncTenantsClient(transport)  # admin scope
        self.usage = AsyncUsageClient(transport)
        self.jobs = AsyncJobsClient(transport)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
