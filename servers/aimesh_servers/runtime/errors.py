"""Domain errors and their AIP-193 form (gRPC status + google.rpc.ErrorInfo).

Engines and servicers raise these; one interceptor turns them into statuses, so no
servicer method carries its own try/except.
"""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from aimesh.common.v1 import common_pb2

DOMAIN = "aimesh.dev"


class AimeshError(Exception):
    """An error a caller should see, with a stable reason."""

    code = grpc.StatusCode.INTERNAL
    reason = common_pb2.ERROR_REASON_ENGINE_FAILURE

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        metadata: dict[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.metadata = dict(metadata or {})
        if field:
            self.metadata.setdefault("field", field)
        self.retry_after_s = retry_after_s

    @property
    def reason_name(self) -> str:
        return common_pb2.ErrorReason.Name(self.reason).removeprefix("ERROR_REASON_")

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason_name, domain=DOMAIN, metadata=self.metadata
        )
        details = [info]
        if self.field:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=self.field, description=self.message
                        )
                    ]
                )
            )
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in details:
            status.details.add().Pack(detail)
        return rpc_status.to_status(status)


class InvalidArgument(AimeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = common_pb2.ERROR_REASON_INVALID_FIELD


class OutOfRange(AimeshError):
    code = grpc.StatusCode.OUT_OF_RANGE
    reason = common_pb2.ERROR_REASON_INVALID_FIELD


class MalformedRequest(AimeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = common_pb2.ERROR_REASON_MALFORMED_REQUEST


class UnsupportedMedia(AimeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = common_pb2.ERROR_REASON_UNSUPPORTED_MEDIA


class ModelNotFound(AimeshError):
    code = grpc.StatusCode.NOT_FOUND
    reason = common_pb2.ERROR_REASON_MODEL_NOT_FOUND

    def __init__(self, model: str, available: list[str], *, field: str = "model") -> None:
        names = ", ".join(sorted(available)) or "none"
        super().__init__(
            f"unknown model {model!r}; available: {names}",
            field=field,
            metadata={"model": model, "available": ",".join(sorted(available))},
        )


class ServerBusy(AimeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = common_pb2.ERROR_REASON_SERVER_BUSY


class NotReady(AimeshError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = common_pb2.ERROR_REASON_SERVER_NOT_READY


class EngineFailure(AimeshError):
    code = grpc.StatusCode.INTERNAL
    reason = common_pb2.ERROR_REASON_ENGINE_FAILURE


class UpstreamFailure(AimeshError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = common_pb2.ERROR_REASON_UPSTREAM_FAILURE


def media_detail(exc: Exception) -> str:
    """': <why>' for a decoder's error, unless it only repeats the buffer's repr."""
    text = str(exc)
    return "" if not text or "<_io." in text else f": {text}"


class Unauthenticated(AimeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = common_pb2.ERROR_REASON_UNAUTHENTICATED


class PermissionDenied(AimeshError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = common_pb2.ERROR_REASON_PERMISSION_DENIED


class TenantNotFound(AimeshError):
    code = grpc.StatusCode.NOT_FOUND
    reason = common_pb2.ERROR_REASON_TENANT_NOT_FOUND

    def __init__(self, tenant_id: str, *, field: str = "tenant_id") -> None:
        super().__init__(f"unknown tenant {tenant_id!r}", field=field,
                         metadata={"tenant_id": tenant_id})


class TokenNotFound(AimeshError):
    code = grpc.StatusCode.NOT_FOUND
    reason = common_pb2.ERROR_REASON_TOKEN_NOT_FOUND

    def __init__(self, token_id: str) -> None:
        super().__init__(f"unknown token id {token_id!r}", field="token_id",
                         metadata={"token_id": token_id})


class TenantAlreadyExists(AimeshError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = common_pb2.ERROR_REASON_TENANT_ALREADY_EXISTS

    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"tenant {tenant_id!r} exists already", field="tenant_id",
                         metadata={"tenant_id": tenant_id})
