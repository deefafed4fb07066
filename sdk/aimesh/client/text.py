"""Text generation: `client.text.generate(...)` and `client.text.stream_generate(...)`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Union

from ..text.v1 import text_generation_pb2 as pb
from ..text.v1 import text_generation_pb2_grpc as pb_grpc
from .transport import AsyncTransport, Transport

#: A chat message: a ChatMessage, a (role, content) pair, or {"role": ..., "content": ...}.
MessageLike = Union[pb.ChatMessage, tuple[str, str], Mapping[str, str]]
_ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}


def _message(message: MessageLike) -> pb.ChatMessage:
    if isinstance(message, pb.ChatMessage):
        return message
    role, content = (message["role"], message["content"]) if isinstance(message, Mapping) else message
    if role not in _ROLES:
        raise ValueError(f"role must be one of {', '.join(_ROLES)}, got {role!r}")
    return pb.ChatMessage(role=_ROLES[role], content=content)


def _fill(request: pb.GenerateRequest | pb.StreamGenerateRequest, model: str,
          messages: Sequence[MessageLike], max_tokens: int | None, temperature: float | None,
          top_p: float | None, stop: Sequence[str], seed: int | None, model_version: str):
    request.model = model
    request.model_version = model_version
    request.messages.extend(_message(m) for m in messages)
    request.stop.extend(stop)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(request, name, value)
    return request


class TextClient:
    """Blocking text generation."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._stub = pb_grpc.TextGenerationServiceStub(transport.channel)

    def generate(self, model: str, messages: Sequence[MessageLike], *, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None,
                 stop: Sequence[str] = (), seed: int | None = None, model_version: str = "",
                 timeout: float | None = None) -> pb.GenerateResponse:
        """The whole answer. `response.text`, `.usage`, `.served_by`."""
        request = _fill(pb.GenerateRequest(), model, messages, max_tokens, temperature, top_p,
                        stop, seed, model_version)
        return self._t.unary(self._stub.Generate, request, model=model, timeout=timeout)

    def stream_generate(self, model: str, messages: Sequence[MessageLike], *,
                        max_tokens: int | None = None, temperature: float | None = None,
                        top_p: float | None = None, stop: Sequence[str] = (), seed: int | None = None,
                        model_version: str = "", timeout: float | None = None
                        ) -> Iterator[pb.StreamGenerateResponse]:
        """Pieces of text as they are generated; the last carries usage and finish_reason.
        Breaking out of the loop cancels the generation on the server."""
        request = _fill(pb.StreamGenerateRequest(), model, messages, max_tokens, temperature,
                        top_p, stop, seed, model_version)
        return self._t.stream(self._stub.StreamGenerate, request, model=model, timeout=timeout)


class AsyncTextClient:
    """Awaitable text generation (same methods as TextClient)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport
        self._stub = pb_grpc.TextGenerationServiceStub(transport.channel)

    async def generate(self, model: str, messages: Sequence[MessageLike], *,
                       max_tokens: int | None = None, temperature: float | None = None,
                       top_p: float | None = None, stop: Sequence[str] = (), seed: int | None = None,
                       model_version: str = "", timeout: float | None = None) -> pb.GenerateResponse:
        request = _fill(pb.GenerateRequest(), model, messages, max_tokens, temperature, top_p,
                        stop, seed, model_version)
        return await self._t.unary(self._stub.Generate, request, model=model, timeout=timeout)

    def stream_generate(self, model: str, messages: Sequence[MessageLike], *,
                        max_tokens: int | None = None, temperature: float | None = None,
                        top_p: float | None = None, stop: Sequence[str] = (), seed: int | None = None,
                        model_version: str = "", timeout: float | None = None
                        ) -> AsyncIterator[pb.StreamGenerateResponse]:
        request = _fill(pb.StreamGenerateRequest(), model, messages, max_tokens, temperature,
                        top_p, stop, seed, model_version)
        return self._t.stream(self._stub.StreamGenerate, request, model=model, timeout=timeout)
