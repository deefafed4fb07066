"""Typed exceptions for failed calls, carrying the AIP-193 details the server sent.

The class follows the status code, whose meaning per reason is the mesh's one error
table (aimesh.error_model); `retryable` is that table's advice for the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from . import error_model


@dataclass
class AimeshError(Exception):
    """A failed call. `reason` is the stable machine-readable part (ErrorInfo.reason)."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None
    field_violations: dict[str, str] = field(default_factory=dict)
    # google.rpc.QuotaFailure: the limits that refused the call, subject -> description.
    quota_violations: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed later, by the error table's advice for the
        reason and its code (after `retry_after_s` when given); without a known reason,
        only UNAVAILABLE is."""
        row = error_model.TABLE.get(self.reason)
        if row is None:
            return self.code == grpc.StatusCode.UNAVAILABLE
        return row.retryable and self.code.value[0] == row.code


class InvalidArgumentError(AimeshError):
    """The request is malformed or a field is out of range (see `field_violations`)."""


class NotFoundError(AimeshError):
    """The model (or version) does not exist; metadata['available'] lists those that do."""


class ResourceExhaustedError(AimeshError):
    """A server is full (reason SERVER_BUSY), a tenant limit is reached (RATE_LIMITED) or
    its budget is spent (BUDGET_EXHAUSTED); retry after `retry_after` seconds.
    `quota_violations` names the limits that refused the call."""

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait before retrying (the server's RetryInfo); None when it gave none."""
        return self.retry_after_s


class UnavailableError(AimeshError):
    """No server could take the call (all down, draining, or the stream was cut)."""


class DeadlineExceededError(AimeshError):
    """The call's deadline passed."""


class UnauthenticatedError(AimeshError):
    """The tenant token is missing, expired or invalid."""


class PermissionDeniedError(AimeshError):
    """The token is valid but not for this mesh or service."""


_BY_CODE: dict[grpc.StatusCode, type[AimeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def from_rpc_error(error: grpc.RpcError) -> AimeshError:
    """Converts a grpc error (sync or aio) into the typed exception."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = error.details() if callable(getattr(error, "details", None)) else str(error)
    result = _BY_CODE.get(code, AimeshError)(code=code, message=message or "")
    if callable(getattr(error, "trailing_metadata", None)):
        _read_details(result, error)
    return result


def _read_details(result: AimeshError, call: grpc.RpcError) -> None:
    """ErrorInfo, RetryInfo, BadRequest and QuotaFailure from the call's google.rpc.Status."""
    try:
        status: status_pb2.Status | None = rpc_status.from_call(call)
    except ValueError:  # a status whose details contradict its code or message: not trusted
        return
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            result.reason, result.domain = info.reason, info.domain
            result.metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            result.retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            result.field_violations = {v.field: v.description for v in bad.field_violations}
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            result.quota_violations = {v.subject: v.description for v in quota.violations}


def stream_cut(error: AimeshError, received: int) -> AimeshError:
    """A stream that failed after delivering messages, with no reason from the server, was
    cut (the server died or the connection reset). The mesh cannot fail it over without
    repeating output already delivered, so the caller gets a clear UNAVAILABLE."""
    if received == 0 or error.reason or error.code not in (
        grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN
    ):
        return error
    return UnavailableError(
        code=grpc.StatusCode.UNAVAILABLE,
        message=f"the stream was cut after {received} message(s) and cannot be resumed "
                f"({error.code.name}: {error.message})",
        reason="STREAM_INTERRUPTED", domain=error_model.DOMAIN,
        metadata={"messages_received": str(received)},
    )
