"""The identity headers the front door's jwt_authn sets from a verified token, added by
a client interceptor: service tests have no Envoy in front of the server."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import grpc

Headers = Sequence[tuple[str, str]]


def identity(tenant: str, scopes: str) -> list[tuple[str, str]]:
    return [("x-aimesh-tenant", tenant), ("x-aimesh-scopes", scopes)]


class AddHeaders(grpc.aio.UnaryUnaryClientInterceptor):
    """For grpc.aio channels: `grpc.aio.insecure_channel(target, interceptors=[AddHeaders(h)])`."""

    def __init__(self, headers: Headers) -> None:
        self.headers = list(headers)

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, [*(details.metadata or ()), *self.headers],
            details.credentials, details.wait_for_ready)
        return await continuation(details, request)


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class AddHeadersSync(grpc.UnaryUnaryClientInterceptor):
    """For blocking channels: `grpc.intercept_channel(channel, AddHeadersSync(h))`."""

    def __init__(self, headers: Headers) -> None:
        self.headers = list(headers)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        details = _Details(details.method, details.timeout,
                           [*(details.metadata or ()), *self.headers], details.credentials,
                           details.wait_for_ready, details.compression)
        return continuation(details, request)
