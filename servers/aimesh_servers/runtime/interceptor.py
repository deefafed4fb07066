"""The one server interceptor every aimesh server runs.

It (1) parses request bytes itself, so that bytes that do not decode get
INVALID_ARGUMENT instead of grpc-python's UNKNOWN "Unexpected DecodeError";
(2) bounds concurrency: a call beyond the limit gets RESOURCE_EXHAUSTED with RetryInfo
at once, never a queue; (3) maps domain errors (AimeshError) to status + ErrorInfo.
Health and reflection calls pass through untouched.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .errors import AimeshError, EngineFailure, MalformedRequest, ServerBusy
from .service import SERVED_BY_METADATA

log = logging.getLogger(__name__)

_PASSTHROUGH = ("/grpc.health.v1.", "/grpc.reflection.")


class ConcurrencyLimit:
    """Counts calls in flight; `try_acquire` fails instead of waiting."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


class AimeshServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, limit: ConcurrencyLimit, retry_after_s: float = 0.5) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_PASSTHROUGH):
            return handler
        return self._wrap(handler, details.method)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer
        serialize = handler.response_serializer

        def decode(raw: bytes) -> Any:
            try:
                return parse(raw)
            except DecodeError as exc:
                raise MalformedRequest(
                    f"request bytes for {method} do not decode as its request message: {exc}"
                ) from exc

        async def decode_stream(raw_iter: AsyncIterator[bytes]) -> AsyncIterator[Any]:
            async for raw in raw_iter:
                yield decode(raw)

        async def admit(context: grpc.aio.ServicerContext) -> None:
            if not self.limit.try_acquire():
                await self._abort(context, ServerBusy(
                    f"server is at its limit of {self.limit.limit} concurrent calls; retry later",
                    metadata={"limit": str(self.limit.limit)},
                    retry_after_s=self.retry_after_s,
                ), method)

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary
            streaming_request = handler.stream_unary is not None

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await admit(context)
                try:
                    req = decode_stream(request) if streaming_request else decode(request)
                    response = await inner(req, context)
                    if served := SERVED_BY_METADATA.get():
                        await context.send_initial_metadata(served)
                    return response
                except AimeshError as exc:
                    await self._abort(context, exc, method)
                except (grpc.aio.AbortError, grpc.aio.UsageError):
                    raise
                except Exception as exc:  # a bug or engine crash: still a clean status
                    log.exception("%s failed", method)
                    await self._abort(context, EngineFailure(f"{method} failed: {exc}"), method)
                finally:
                    self.limit.release()

            factory = (
                grpc.stream_unary_rpc_method_handler
                if streaming_request
                else grpc.unary_unary_rpc_method_handler
            )
            return factory(unary_response, None, serialize)

        inner_stream = handler.unary_stream or handler.stream_stream
        streaming_request = handler.stream_stream is not None

        async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(context)
            try:
                req = decode_stream(request) if streaming_request else decode(request)
                first = True
                async for response in inner_stream(req, context):
                    if first and (served := SERVED_BY_METADATA.get()):
                        await context.send_initial_metadata(served)
                    first = False
                    yield response
            except AimeshError as exc:
                await self._abort(context, exc, method)
            except (grpc.aio.AbortError, grpc.aio.UsageError):
                raise
            except Exception as exc:
                log.exception("%s failed", method)
                await self._abort(context, EngineFailure(f"{method} failed: {exc}"), method)
            finally:
                self.limit.release()

        factory = (
            grpc.stream_stream_rpc_method_handler
            if streaming_request
            else grpc.unary_stream_rpc_method_handler
        )
        return factory(stream_response, None, serialize)

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: AimeshError, method: str) -> None:
        log.info("%s -> %s %s: %s", method, exc.code.name, exc.reason_name, exc.message)
        await context.abort_with_status(exc.to_status())
