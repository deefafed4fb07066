"""Envoy bootstrap generated from the model registry (typed data in, validated YAML out).

Shape of the front door:
- one listener: header_mutation (drop identity headers a caller could forge) -> Lua (copy
  {model} from `/v1/models/{model}:verb` into `x-aimesh-model`) -> gRPC-JSON transcoder
  (HTTP/JSON, server streams as SSE) -> router;
- routes: reflection, health, registry and usage -> control server; per model and
  service, `x-aimesh-model: <id>` -> that model's cluster; a call that names no model goes
  to the capability's default model; one naming an unknown model goes to the control
  server, which answers NOT_FOUND listing the models that exist;
- one cluster per model, endpoints from EDS files the mesh controller writes (one
  priority level per pool: the fallback chain), with gRPC health checks, outlier
  detection, retries onto the next priority, a retry budget and circuit breakers.
Traps from running these configs (see the Envoy reference notes): the default retry
circuit breaker (3) drops calls under failover; health checks need no_traffic_interval,
and a removed host must not keep traffic (ignore_health_on_host_removal).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.rpc import code_pb2, error_details_pb2, status_pb2

from ..registry.schema import Model, Registry
from ..runtime.errors import DOMAIN

MODEL_HEADER = "x-aimesh-model"
# Identity headers only Envoy may set (after verifying a token); a caller's copy is dropped.
FORGEABLE_HEADERS = ("x-tenant",)
CONTROL_CLUSTER = "control"
CONTROL_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.health.v1.Health/",
    "/aimesh.registry.v1.ModelRegistryService/",
    "/aimesh.usage.v1.UsageService/",
)
RETRY_ON = "unavailable,cancelled,resource-exhausted,connect-failure,refused-stream,reset"

LUA_MODEL_FROM_PATH = """
function envoy_on_request(handle)
  local path = handle:headers():get(":path") or ""
  local model = string.match(path, "^/v1/models/([^/:?]+):")
  if model then handle:headers():replace("x-aimesh-model", model) end
end
"""

ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "model": "%REQ(X-AIMESH-MODEL)%",
    "served_model": "%RESP(X-AIMESH-SERVED-MODEL)%",
    "pool": "%RESP(X-AIMESH-POOL)%",
    "tenant": "%REQ(X-TENANT)%",
    "cluster": "%UPSTREAM_CLUSTER%",
    "upstream": "%UPSTREAM_HOST%",
    "http_status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS%",
    "flags": "%RESPONSE_FLAGS%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "duration_ms": "%DURATION%",
}


@dataclass(frozen=True)
class MeshSpec:
    registry: Registry
    state_dir: Path  # holds descriptors.pb, eds/, access.log
    control_port: int
    listen_host: str = "127.0.0.1"
    port: int = 8080
    admin_port: int = 9901
    route_timeout_s: int = 300

    @property
    def eds_dir(self) -> Path:
        return self.state_dir / "eds"

    @property
    def descriptor_path(self) -> Path:
        return self.state_dir / "descriptors.pb"

    def eds_path(self, model: Model) -> Path:
        return self.eds_dir / f"{model.cluster}.yaml"


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _http2() -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            explicit_http_config={"http2_protocol_options": {}},
        )
    }


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def model_cluster(spec: MeshSpec, model: Model) -> dict[str, Any]:
    return {
        "name": model.cluster,
        "type": "EDS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _http2(),
        "eds_cluster_config": {
            "eds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": str(spec.eds_path(model)),
                    "watched_directory": {"path": str(spec.eds_dir)},
                },
            }
        },
        "health_checks": [{
            # A dead server refuses the connection at once; the timeout only has to spare a
            # busy Python server whose event loop shares two cores with the model.
            "timeout": "2s",
            "interval": "1s",
            "no_traffic_interval": "1s",  # default 60 s would leave a new server idle for a minute
            "unhealthy_threshold": 3,
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name": model.services[0]},
        }],
        "ignore_health_on_host_removal": True,
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},  # never route to known-bad hosts
        "outlier_detection": {
            "consecutive_5xx": 3,
            "consecutive_gateway_failure": 3,
            "enforcing_consecutive_gateway_failure": 100,
            "interval": "0.5s",
            "base_ejection_time": "3s",
            "max_ejection_percent": 100,
        },
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": 1024,
            "max_pending_requests": 1024,
            "max_requests": 1024,
            # Retries may add at most half the active load, but never fewer than 64 at once
            # (the default of 3 concurrent retries dropped calls during failover).
            "retry_budget": {"budget_percent": {"value": 50.0}, "min_retry_concurrency": 64},
        }]},
    }


def control_cluster(spec: MeshSpec) -> dict[str, Any]:
    return {
        "name": CONTROL_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _http2(),
        "load_assignment": {
            "cluster_name": CONTROL_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": spec.control_port}}}}]}],
        },
    }


def _retry_policy() -> dict[str, Any]:
    return {
        "retry_on": RETRY_ON,
        "num_retries": 2,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": _typed(
                "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"),
        }],
        "host_selection_retry_max_attempts": 3,
        # Each retry goes to the next priority (pool) of the fallback chain.
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": _typed(
                "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                update_frequency=1,
            ),
        },
    }


def _model_route(spec: MeshSpec, service: str, model: Model, by_header: bool) -> dict[str, Any]:
    match: dict[str, Any] = {"prefix": f"/{service}/"}
    if by_header:
        match["headers"] = [{"name": MODEL_HEADER, "string_match": {"exact": model.id}}]
    else:
        match["headers"] = [{"name": MODEL_HEADER, "present_match": False}]
    return {
        "name": f"{model.id}:{service}" + ("" if by_header else ":default"),
        "match": match,
        "route": {
            "cluster": model.cluster,
            "timeout": _duration(spec.route_timeout_s),
            # A gRPC caller's own deadline (grpc-timeout) applies, capped by the route timeout.
            "max_stream_duration": {"grpc_timeout_header_max": _duration(spec.route_timeout_s)},
            "retry_policy": _retry_policy(),
        },
    }


def routes(spec: MeshSpec) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"match": {"prefix": prefix}, "route": {"cluster": CONTROL_CLUSTER, "timeout": "30s"}}
        for prefix in CONTROL_PREFIXES
    ]
    defaults: set[str] = set()
    for model in spec.registry.models:
        for service in model.services:
            out.append(_model_route(spec, service, model, by_header=True))
    for model in spec.registry.models:
        for service in model.services:
            if service not in defaults:  # the first model of a capability is its default
                defaults.add(service)
                out.append(_model_route(spec, service, model, by_header=False))
    # Any other aimesh call names a model that does not exist: control answers NOT_FOUND.
    out.append({"match": {"prefix": "/aimesh."}, "route": {"cluster": CONTROL_CLUSTER, "timeout": "30s"}})
    out.append({"match": {"prefix": "/"}, "direct_response": {
        "status": 404, "body": {"inline_string": "no such aimesh route; see GET /v1/models\n"}}})
    return out


def http_filters(spec: MeshSpec, services: list[str]) -> list[dict[str, Any]]:
    return [
        {"name": "envoy.filters.http.header_mutation", "typed_config": _typed(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            mutations={"request_mutations": [{"remove": h} for h in FORGEABLE_HEADERS]})},
        {"name": "envoy.filters.http.lua", "typed_config": _typed(
            "envoy.extensions.filters.http.lua.v3.Lua",
            default_source_code={"inline_string": LUA_MODEL_FROM_PATH})},
        {"name": "envoy.filters.http.grpc_json_transcoder", "typed_config": _typed(
            "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            proto_descriptor=str(spec.descriptor_path),
            services=services,
            convert_grpc_status=True,
            print_options={
                "preserve_proto_field_names": True,
                "always_print_primitive_fields": True,
                "stream_sse_style_delimited": True,
            },
            request_validation_options={"reject_unknown_query_parameters": True},
        )},
        {"name": "envoy.filters.http.router", "typed_config": _typed(
            "envoy.extensions.filters.http.router.v3.Router")},
    ]


# Envoy answers itself when no pool of a chain could take the call: no healthy host
# (UH), connection failures on every try (UF, URX) or circuit breaker overflow (UO).
UNROUTABLE_FLAGS = ["UH", "UF", "URX", "UO"]


def _unavailable(model: Model) -> tuple[str, status_pb2.Status]:
    chain = " -> ".join(p.id for p in model.pools)
    message = f"model {model.id!r} is unavailable: no healthy server in its fallback chain ({chain})"
    info = error_details_pb2.ErrorInfo(reason="MODEL_UNAVAILABLE", domain=DOMAIN,
                                       metadata={"model": model.id, "pools": ",".join(p.id for p in model.pools)})
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message)
    status.details.add().Pack(info)
    return message, status


def local_reply_mappers(spec: MeshSpec) -> list[dict[str, Any]]:
    """Envoy's own 'no healthy upstream' becomes AIP-193: UNAVAILABLE + ErrorInfo naming the
    model, as grpc-status-details-bin for gRPC callers and a google.rpc.Status JSON body over HTTP."""
    mappers = []
    for model in spec.registry.models:
        message, status = _unavailable(model)
        details_bin = base64.b64encode(status.SerializeToString()).decode().rstrip("=")
        unroutable = {"response_flag_filter": {"flags": UNROUTABLE_FLAGS}}
        this_model = {"header_filter": {"header": {
            "name": MODEL_HEADER, "string_match": {"exact": model.id}}}}
        # The transcoder turned an HTTP/JSON call into gRPC and kept its path in this header.
        from_http = {"header_filter": {"header": {
            "name": "x-envoy-original-path", "present_match": True}}}
        mappers.append({
            "filter": {"and_filter": {"filters": [unroutable, this_model, from_http]}},
            "body_format_override": {
                "json_format": {
                    "code": code_pb2.UNAVAILABLE, "message": message,
                    "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                 "reason": "MODEL_UNAVAILABLE", "domain": DOMAIN,
                                 "metadata": {"model": model.id}}]},
                "content_type": "application/json"},
        })
        mappers.append({
            "filter": {"and_filter": {"filters": [unroutable, this_model]}},
            "headers_to_add": [{"header": {"key": "grpc-status-details-bin", "value": details_bin},
                                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
            "body": {"inline_string": message},
        })
    return mappers


def bootstrap(spec: MeshSpec, services: list[str]) -> dict[str, Any]:
    hcm = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="aimesh",
        codec_type="AUTO",
        route_config={"name": "aimesh", "virtual_hosts": [
            {"name": "aimesh", "domains": ["*"], "routes": routes(spec)}]},
        http_filters=http_filters(spec, services),
        access_log=[{"name": "envoy.access_loggers.file", "typed_config": _typed(
            "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            path=str(spec.state_dir / "access.log"),
            log_format={"json_format": ACCESS_LOG_FORMAT})}],
        # Streams (tokens, audio) can run long; the route timeout bounds them instead.
        stream_idle_timeout="300s",
        local_reply_config={"mappers": local_reply_mappers(spec)},
    )
    return {
        "node": {"id": "aimesh-front-door", "cluster": "aimesh"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": spec.admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "front_door",
                "address": {"socket_address": {"address": spec.listen_host, "port_value": spec.port}},
                "filter_chains": [{"filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
            }],
            "clusters": [control_cluster(spec), *(model_cluster(spec, m) for m in spec.registry.models)],
        },
    }
