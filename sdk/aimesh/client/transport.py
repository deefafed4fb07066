"""Channels, metadata, deadlines and error mapping shared by every capability client.

Each call gets a deadline (the client's default or the call's own `timeout`), the
tenant token as `authorization: Bearer ...`, the routing header naming the
model, and the caller's OpenTelemetry trace context when it has one (client.tracing).
Retries are a gRPC service config on the channel, never hand-written loops: a call
that fails UNAVAILABLE, or RESOURCE_EXHAUSTED from a busy server (`retry_busy`),
before any response arrived is tried again, at most `max_attempts` times in all.

A busy aimesh server answers RESOURCE_EXHAUSTED with RetryInfo and the same delay,
jittered, as `grpc-retry-pushback-ms`, which gRPC waits for before the next attempt; it
sends -1 (no retry) when that delay would not fit the call's deadline. `retryThrottling`
stops retries on a channel whose calls mostly fail, so retries cannot multiply load.

Attempt budget, Envoy included: at most 3 per call. The front door retries a call's
first attempt up to twice, along the fallback chain, and never an attempt that is
itself a retry (one carrying `grpc-previous-rpc-attempts`); when its third attempt
fails it answers with pushback -1, so the SDK retries (MAX_ATTEMPTS = 2) only a call
that cost Envoy at most 2: 2 + 1 or 3 + 0 (see `_retry_policy` in the Envoy config).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import grpc

from ..errors import from_rpc_error, stream_cut
from .tracing import traced

MODEL_HEADER = "x-aimesh-model"
DEFAULT_TIMEOUT_S = 120.0
Resp = TypeVar("Resp")


MAX_ATTEMPTS = 2
# gRPC's retry throttling per channel: each failed call costs a token, each success earns
# 0.1; below half of the tokens, no call is retried.
RETRY_THROTTLING = {"maxTokens": 10, "tokenRatio": 0.1}


def service_config(max_attempts: int = MAX_ATTEMPTS, retry_busy: bool = True) -> str:
    """Retry policy for every aimesh service as a gRPC service config (JSON)."""
    codes = ["UNAVAILABLE", "RESOURCE_EXHAUSTED"] if retry_busy else ["UNAVAILABLE"]
    policy = {
        "maxAttempts": max_attempts,
        "initialBackoff": "0.2s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": codes,
    }
    return json.dumps({"methodConfig": [{"name": [{}], "retryPolicy": policy}],
                       "retryThrottling": RETRY_THROTTLING})


def channel_options(max_attempts: int = MAX_ATTEMPTS, retry_busy: bool = True) -> list[tuple[str, Any]]:
    if not 1 <= max_attempts <= MAX_ATTEMPTS:
        raise ValueError(f"max_attempts must be 1 (no retry) to {MAX_ATTEMPTS}: the front door may "
                         f"add two tries, and a call never costs more than 3; got {max_attempts}")
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.enable_retries", 1 if max_attempts > 1 else 0),
    ]
    if max_attempts > 1:
        options.append(("grpc.service_config", service_config(max_attempts, retry_busy)))
    return options


class _Common:
    def __init__(self, token: str | None, timeout: float) -> None:
        self.token = token
        self.timeout = timeout

    def metadata(self, model: str) -> list[tuple[str, str]]:
        metadata = []
        if model:
            metadata.append((MODEL_HEADER, model))
        if self.token:
            metadata.append(("authorization", f"Bearer {self.token}"))
        return metadata

    def deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


class Transport(_Common):
    """Blocking calls over a `grpc.Channel`."""

    def __init__(self, channel: grpc.Channel, token: str | None, timeout: float) -> None:
        super().__init__(token, timeout)
        self.channel = channel

    def unary(self, method: Callable[..., Resp], request: Any, *, model: str = "",
              timeout: float | None = None) -> Resp:
        with traced(method) as trace_context:
            try:
                return method(request, metadata=[*self.metadata(model), *trace_context],
                              timeout=self.deadline(timeout))
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None

    def stream(self, method: Callable[..., Any], request: Any, *, model: str = "",
               timeout: float | None = None) -> Iterator[Any]:
        """Server (or bidi) stream; leaving the loop early cancels the call on the server."""
        with traced(method) as trace_context:
            call = method(request, metadata=[*self.metadata(model), *trace_context],
                          timeout=self.deadline(timeout))
            received = 0
            try:
                for response in call:
                    received += 1
                    yield response
            except grpc.RpcError as exc:
                raise stream_cut(from_rpc_error(exc), received) from None
            finally:
                call.cancel()


class AsyncTransport(_Common):
    """Awaitable calls over a `grpc.aio.Channel`."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None, timeout: float) -> None:
        super().__init__(token, timeout)
        self.channel = channel

    async def unary(self, method: Callable[..., Any], request: Any, *, model: str = "",
                    timeout: float | None = None) -> Any:
        with traced(method) as trace_context:
            try:
                return await method(request, metadata=[*self.metadata(model), *trace_context],
                                    timeout=self.deadline(timeout))
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None

    async def stream(self, method: Callable[..., Any], request: Any, *, model: str = "",
                     timeout: float | None = None) -> AsyncIterator[Any]:
        with traced(method) as trace_context:
            call = method(request, metadata=[*self.metadata(model), *trace_context],
                          timeout=self.deadline(timeout))
            received = 0
            try:
                async for response in call:
                    received += 1
                    yield response
            except grpc.RpcError as exc:
                raise stream_cut(from_rpc_error(exc), received) from None
            finally:
                call.cancel()
