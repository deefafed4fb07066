"""The one error table: complete, consistent with the retry policies, and what a real
server sends and the SDK raises."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import aimesh
import grpc
import pytest
from aimesh import error_model
from aimesh.client.transport import service_config
from aimesh.common.v1 import common_pb2
from aimesh.errors import from_rpc_error
from aimesh_servers.mesh.envoy_config import RETRY_ON
from aimesh_servers.mesh.tenancy_envoy import LUA_ADMISSION
from aimesh_servers.providers import openai_compat
from aimesh_servers.runtime import errors
from aimesh_servers.runtime.admission import Admission
from aimesh_servers.runtime.interceptor import AimeshServerInterceptor
from google.rpc import code_pb2

SERVERS = Path(errors.__file__).parents[1]
METHOD = "/aimesh.test.v1.ErrorService/Raise"
SECRET = "password=hunter2 at /srv/model.bin"


def domain_errors() -> list[type[errors.AimeshError]]:
    found: list[type[errors.AimeshError]] = []
    pending = [errors.AimeshError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


ERRORS = {cls.__name__: cls for cls in domain_errors() if cls.__module__ in
          (errors.__name__, openai_compat.__name__)}


def test_the_table_names_every_reason_of_the_enum_and_nothing_else():
    reasons = {error_model.reason_name(v) for v in common_pb2.ErrorReason.values()} - {"UNSPECIFIED"}
    assert set(error_model.TABLE) == reasons


def test_http_status_follows_the_code_and_variants_are_other_codes():
    for name, row in error_model.TABLE.items():
        assert row.http_status == (row.http or error_model.HTTP_STATUS[row.code]), name
        assert row.http is None or row.http // 100 == error_model.HTTP_STATUS[row.code] // 100, name
        assert row.code not in row.variants, name
        assert not (row.retry_info and not row.retryable), name


def test_retry_advice_agrees_with_the_sdk_service_config_and_envoys_retry_policy():
    policy = json.loads(service_config())["methodConfig"][0]["retryPolicy"]
    sdk_codes = {code_pb2.Code.Name(r.code) for r in error_model.TABLE.values() if r.sdk_retries}
    assert sdk_codes == set(policy["retryableStatusCodes"])
    envoy_codes = {code_pb2.Code.Name(r.code).lower().replace("_", "-")
                   for r in error_model.TABLE.values() if r.envoy_retries}
    assert envoy_codes <= set(RETRY_ON.split(","))
    # Outlier detection enforces gateway failures only (502/503/504): an INTERNAL answer to
    # a caller's input must never eject a host.
    for name, row in error_model.TABLE.items():
        assert row.ejects == (row.envoy_retries and row.http_status in (502, 503, 504)), name


def test_the_front_doors_lua_refusals_take_their_codes_from_the_table():
    table = re.search(r"^local REFUSALS = (.*)$", LUA_ADMISSION, re.MULTILINE)
    assert table is not None
    rows = dict(re.findall(r"(\w+) = \{(\d+, \"\d+\")\}", table.group(1)))
    assert set(rows) == set(re.findall(r'refuse\(h, \{reason = "(\w+)"', LUA_ADMISSION)) | {"BUDGET_EXHAUSTED"}
    for reason, pair in rows.items():
        row = error_model.TABLE[reason]
        assert pair == f'{row.code}, "{row.http_status}"', reason


def test_a_code_outside_the_table_is_refused_when_the_error_class_is_defined():
    with pytest.raises(ValueError, match="OUT_OF_RANGE is not a code of reason"):
        type("Wrong", (errors.AimeshError,), {"reason": common_pb2.ERROR_REASON_SERVER_BUSY,
                                               "code_variant": code_pb2.OUT_OF_RANGE})


def test_no_engine_or_domain_error_module_imports_grpc():
    modules = [*SERVERS.glob("*/engine.py"), *SERVERS.glob("speech/*_engine.py"),
               SERVERS / "runtime" / "errors.py", SERVERS / "providers" / "openai_compat.py",
               Path(error_model.__file__)]
    assert len(modules) >= 8
    for path in modules:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert "grpc" not in imported and "grpc_status" not in imported, path


def _raise(name: str) -> None:
    if name == "crash":
        raise RuntimeError(SECRET)
    cls = ERRORS[name]
    if cls is errors.ModelNotFound:
        raise cls("nope", ["a", "b"])
    if cls in (errors.TenantNotFound, errors.TokenNotFound, errors.TenantAlreadyExists,
               errors.JobNotFound):
        raise cls("t1")
    raise cls(f"{name} happened", field="prompt", metadata={"k": "v"}, retry_after_s=1.5)


@pytest.fixture
async def channel():
    async def handle(request: str, context: grpc.aio.ServicerContext) -> bytes:
        _raise(request)
        return b""

    server = grpc.aio.server(interceptors=[AimeshServerInterceptor(Admission(4, 4, 1.0))])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("aimesh.test.v1.ErrorService", {
        "Raise": grpc.unary_unary_rpc_method_handler(handle, request_deserializer=bytes.decode)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan
    await server.stop(0)


SDK_CLASS = {
    "INVALID_ARGUMENT": aimesh.InvalidArgumentError, "OUT_OF_RANGE": aimesh.InvalidArgumentError,
    "NOT_FOUND": aimesh.NotFoundError, "RESOURCE_EXHAUSTED": aimesh.ResourceExhaustedError,
    "UNAVAILABLE": aimesh.UnavailableError, "UNAUTHENTICATED": aimesh.UnauthenticatedError,
    "PERMISSION_DENIED": aimesh.PermissionDeniedError,
}


async def call(channel: grpc.aio.Channel, name: str) -> aimesh.AimeshError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(METHOD)(name.encode(), timeout=30)
    return from_rpc_error(caught.value)


@pytest.mark.parametrize("name", sorted(set(ERRORS) - {"AimeshError"}))
async def test_each_domain_error_reaches_the_sdk_with_the_tables_code_and_class(channel, name):
    cls = ERRORS[name]
    error = await call(channel, name)
    row = error_model.spec(cls.reason)
    expected = cls.code_variant if cls.code_variant is not None else row.code
    assert error.code.value[0] == expected and error.reason == error_model.reason_name(cls.reason)
    assert error.domain == error_model.DOMAIN
    assert type(error) is SDK_CLASS.get(error.code.name, aimesh.AimeshError)
    assert error.retryable == (row.retryable and expected == row.code)
    if cls not in (errors.ModelNotFound, errors.TenantNotFound, errors.TokenNotFound,
                   errors.TenantAlreadyExists, errors.JobNotFound):
        assert error.metadata == {"k": "v", "field": "prompt"} and error.retry_after_s == 1.5
        assert error.field_violations == {"prompt": f"{name} happened"}


async def test_an_unexpected_exception_is_internal_with_an_incident_id_and_no_detail(channel):
    error = await call(channel, "crash")
    assert error.code == grpc.StatusCode.INTERNAL and error.reason == "ENGINE_FAILURE"
    incident = error.metadata["incident_id"]
    assert incident in error.message and "hunter2" not in error.message and "/srv" not in error.message
    assert not error.retryable
