"""Domain errors: a stable reason and the facts (field, metadata, retry delay), no transport.

Engines and servicers raise these; one interceptor turns them into gRPC statuses, taking
the code from the mesh's one error table (aimesh.error_model), so no servicer method
carries its own try/except and no engine imports grpc.
"""

from __future__ import annotations

from typing import ClassVar

from aimesh import error_model
from aimesh.common.v1 import common_pb2
from google.rpc import code_pb2

DOMAIN = error_model.DOMAIN


class AimeshError(Exception):
    """An error a caller should see, with a stable reason."""

    reason: ClassVar[int] = common_pb2.ERROR_REASON_ENGINE_FAILURE
    # One of the reason's variant codes in the table, when the facts call for it.
    code_variant: ClassVar[int | None] = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        error_model.code_for(cls.reason, cls.code_variant)  # a reason or variant not in the table fails at import

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
        return error_model.reason_name(self.reason)

    @property
    def code(self) -> int:
        """The google.rpc.Code the error table gives this error."""
        return error_model.code_for(self.reason, self.code_variant)


class InvalidArgument(AimeshError):
    reason = common_pb2.ERROR_REASON_INVALID_FIELD


class OutOfRange(AimeshError):
    code_variant = code_pb2.OUT_OF_RANGE
    reason = common_pb2.ERROR_REASON_INVALID_FIELD


class MalformedRequest(AimeshError):
    reason = common_pb2.ERROR_REASON_MALFORMED_REQUEST


class UnsupportedMedia(AimeshError):
    reason = common_pb2.ERROR_REASON_UNSUPPORTED_MEDIA


class ModelNotFound(AimeshError):
    reason = common_pb2.ERROR_REASON_MODEL_NOT_FOUND

    def __init__(self, model: str, available: list[str], *, field: str = "model") -> None:
        names = ", ".join(sorted(available)) or "none"
        super().__init__(
            f"unknown model {model!r}; available: {names}",
            field=field,
            metadata={"model": model, "available": ",".join(sorted(available))},
        )


class ServerBusy(AimeshError):
    reason = common_pb2.ERROR_REASON_SERVER_BUSY


class NotReady(AimeshError):
    reason = common_pb2.ERROR_REASON_SERVER_NOT_READY


class EngineFailure(AimeshError):
    reason = common_pb2.ERROR_REASON_ENGINE_FAILURE


class UpstreamFailure(AimeshError):
    reason = common_pb2.ERROR_REASON_UPSTREAM_FAILURE


def media_detail(exc: Exception) -> str:
    """': <why>' for a decoder's error, unless it only repeats the buffer's repr."""
    text = str(exc)
    return "" if not text or "<_io." in text else f": {text}"


class Unauthenticated(AimeshError):
    reason = common_pb2.ERROR_REASON_UNAUTHENTICATED


class PermissionDenied(AimeshError):
    reason = common_pb2.ERROR_REASON_PERMISSION_DENIED


class TenantNotFound(AimeshError):
    reason = common_pb2.ERROR_REASON_TENANT_NOT_FOUND

    def __init__(self, tenant_id: str, *, field: str = "tenant_id") -> None:
        super().__init__(f"unknown tenant {tenant_id!r}", field=field,
                         metadata={"tenant_id": tenant_id})


class TokenNotFound(AimeshError):
    reason = common_pb2.ERROR_REASON_TOKEN_NOT_FOUND

    def __init__(self, token_id: str) -> None:
        super().__init__(f"unknown token id {token_id!r}", field="token_id",
                         metadata={"token_id": token_id})


class JobNotFound(AimeshError):
    """No such job for this tenant (another tenant's job is not found either)."""

    reason = common_pb2.ERROR_REASON_JOB_NOT_FOUND

    def __init__(self, name: str) -> None:
        super().__init__(f"no job {name!r}", field="name", metadata={"name": name})
        self.name = name


class TenantAlreadyExists(AimeshError):
    reason = common_pb2.ERROR_REASON_TENANT_ALREADY_EXISTS

    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"tenant {tenant_id!r} exists already", field="tenant_id",
                         metadata={"tenant_id": tenant_id})
