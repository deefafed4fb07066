"""The one error table of the mesh: each ErrorInfo reason -> gRPC status, HTTP status and
retry advice.

Servers raise errors that carry only a reason (the `ErrorReason` enum of
aimesh/common/v1/common.proto); their interceptor, Envoy's own answers (local replies and
the Lua admission refusals, generated into the config from this table) and the SDK's
exception classes all take the code from here. It is hand-written: a unit test checks
that it names every reason of the enum, and that the retry advice agrees with the SDK's
service config and Envoy's retry policy.

Codes are `google.rpc.Code` numbers (the same numbers as grpc.StatusCode), so the table
knows no transport library.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.rpc import code_pb2

from .common.v1 import common_pb2

DOMAIN = "aimesh.dev"

# google.rpc.Code -> HTTP status, as google.rpc documents it (and Envoy's transcoder maps).
HTTP_STATUS: dict[int, int] = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
}


@dataclass(frozen=True)
class ErrorSpec:
    """How one reason travels and whether trying again can help."""

    code: int
    """google.rpc.Code of the status."""
    retryable: bool
    """The same call may succeed later (elsewhere, or after the delay in RetryInfo)."""
    retry_info: bool = False
    """The status carries RetryInfo: when to come back."""
    sdk_retries: bool = False
    """The SDK's gRPC service config retries it by itself (before any answer arrived)."""
    envoy_retries: bool = False
    """The front door retries it on another host or pool of the model's chain."""
    ejects: bool = False
    """Envoy's outlier detection counts it against the host that answered (a gateway
    failure); what a caller's input causes never does."""
    variants: tuple[int, ...] = ()
    """Other codes a raiser may pick for this reason when the facts call for it (a value
    past a limit is OUT_OF_RANGE; a provider's refusal keeps the provider's meaning). The
    retry advice is for `code`: under a variant, the request itself was refused."""
    http: int | None = None
    """An HTTP status more precise than the code's (413 for a body over the limit)."""

    @property
    def http_status(self) -> int:
        return self.http or HTTP_STATUS[self.code]

    @property
    def code_name(self) -> str:
        return code_pb2.Code.Name(self.code)


C = code_pb2

TABLE: dict[str, ErrorSpec] = {
    "INVALID_FIELD": ErrorSpec(C.INVALID_ARGUMENT, False, variants=(C.OUT_OF_RANGE,)),
    "MODEL_NOT_FOUND": ErrorSpec(C.NOT_FOUND, False),
    "SERVER_BUSY": ErrorSpec(C.RESOURCE_EXHAUSTED, True, retry_info=True, sdk_retries=True,
                             envoy_retries=True),
    "SERVER_NOT_READY": ErrorSpec(C.UNAVAILABLE, True, sdk_retries=True, envoy_retries=True,
                                  ejects=True),
    "MALFORMED_REQUEST": ErrorSpec(C.INVALID_ARGUMENT, False),
    "ENGINE_FAILURE": ErrorSpec(C.INTERNAL, False),
    "UNSUPPORTED_MEDIA": ErrorSpec(C.INVALID_ARGUMENT, False),
    "UPSTREAM_FAILURE": ErrorSpec(C.UNAVAILABLE, True, sdk_retries=True, envoy_retries=True,
                                  ejects=True, variants=(C.INVALID_ARGUMENT, C.NOT_FOUND)),
    # Output was delivered already: only the caller may decide to ask again.
    "STREAM_INTERRUPTED": ErrorSpec(C.UNAVAILABLE, True),
    # Tenant refusals: the caller waits for RetryInfo; nothing retries by itself.
    "RATE_LIMITED": ErrorSpec(C.RESOURCE_EXHAUSTED, True, retry_info=True),
    "BUDGET_EXHAUSTED": ErrorSpec(C.RESOURCE_EXHAUSTED, True, retry_info=True),
    # Envoy's own answer once every pool of the chain failed.
    "MODEL_UNAVAILABLE": ErrorSpec(C.UNAVAILABLE, True, sdk_retries=True),
    "UNAUTHENTICATED": ErrorSpec(C.UNAUTHENTICATED, False),
    "PERMISSION_DENIED": ErrorSpec(C.PERMISSION_DENIED, False),
    "TENANT_NOT_FOUND": ErrorSpec(C.NOT_FOUND, False),
    "TOKEN_NOT_FOUND": ErrorSpec(C.NOT_FOUND, False),
    "TENANT_ALREADY_EXISTS": ErrorSpec(C.ALREADY_EXISTS, False),
    "JOB_NOT_FOUND": ErrorSpec(C.NOT_FOUND, False),
    # Envoy's answer to a body over its capability's limit (never retried: it stays too large).
    "REQUEST_TOO_LARGE": ErrorSpec(C.INVALID_ARGUMENT, False, http=413),
}
del C


def reason_name(reason: int) -> str:
    """ERROR_REASON_SERVER_BUSY -> "SERVER_BUSY" (the ErrorInfo.reason on the wire)."""
    return common_pb2.ErrorReason.Name(reason).removeprefix("ERROR_REASON_")


def spec(reason: int | str) -> ErrorSpec:
    """The table's row for an enum value or a wire name; KeyError for an unknown reason."""
    return TABLE[reason if isinstance(reason, str) else reason_name(reason)]


def code_for(reason: int | str, variant: int | None = None) -> int:
    """The status code for a reason: the table's, or one of its listed variants."""
    row = spec(reason)
    if variant is None or variant == row.code:
        return row.code
    if variant not in row.variants:
        raise ValueError(f"{code_pb2.Code.Name(variant)} is not a code of reason {reason!r} "
                         f"(allowed: {row.code_name}, {', '.join(map(code_pb2.Code.Name, row.variants))})")
    return variant
