"""Text embeddings: `client.embedding.embed(model, texts, normalize=True)`."""

from __future__ import annotations

from collections.abc import Sequence

from ..embedding.v1 import embedding_pb2 as pb
from ..embedding.v1 import embedding_pb2_grpc as pb_grpc
from .transport import AsyncTransport, Transport


def _request(model: str, texts: Sequence[str], normalize: bool, model_version: str) -> pb.EmbedRequest:
    if isinstance(texts, str):  # a lone string would be embedded character by character
        raise TypeError("texts must be a sequence of strings, not one string")
    return pb.EmbedRequest(model=model, model_version=model_version, texts=texts, normalize=normalize)


def vectors(response: pb.EmbedResponse) -> list[list[float]]:
    """The vectors of a response as plain lists, in the order of the texts."""
    return [list(e.values) for e in response.embeddings]


class EmbeddingClient:
    """Blocking text embeddings."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._stub = pb_grpc.EmbeddingServiceStub(transport.channel)

    def embed(self, model: str, texts: Sequence[str], *, normalize: bool = False,
              model_version: str = "", timeout: float | None = None) -> pb.EmbedResponse:
        """One vector per text (`response.embeddings[i].values`), `.dimensions`, and
        `.usage` in tokens. normalize: scale every vector to unit length."""
        request = _request(model, texts, normalize, model_version)
        return self._t.unary(self._stub.Embed, request, model=model, timeout=timeout)


class AsyncEmbeddingClient:
    """Awaitable text embeddings (same method as EmbeddingClient)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport
        self._stub = pb_grpc.EmbeddingServiceStub(transport.channel)

    async def embed(self, model: str, texts: Sequence[str], *, normalize: bool = False,
                    model_version: str = "", timeout: float | None = None) -> pb.EmbedResponse:
        request = _request(model, texts, normalize, model_version)
        return await self._t.unary(self._stub.Embed, request, model=model, timeout=timeout)
