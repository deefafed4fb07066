"""Envoy bootstrap generated from the model registry (typed data in, validated YAML out).

Shape of the front door:
- one listener: header_mutation (drop internal headers a caller could forge) -> gRPC-JSON
  transcoder (HTTP/JSON, server streams as SSE) -> jwt_authn (ECDS file: verified claims
  into x-aimesh-tenant/-scopes/-token-id; only with tenancy on) -> Lua (copy {model} from
  `/v1/models/{model}:verb` into `x-aimesh-model`, then admission: see tenancy_envoy) ->
  router. jwt_authn and Lua sit after the transcoder so they see the gRPC path of every
  call (with jwt_authn before it, an HTTP/JSON call without a token got through);
- routes from an RDS file (rewritten at runtime with the admission state in the virtual
  host's metadata and its version in each route's): reflection, health and the registry
  -> control server (no token needed); tenant and usage APIs -> control; per model and
  service, `x-aimesh-model: <id>` -> that model's cluster; a call that names no model goes
  to the capability's default model; one naming an unknown model goes to the control
  server, which answers NOT_FOUND listing the models that exist; the servers' usage
  ingest service is never routed from outside;
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

from aimesh import error_model
from google.rpc import error_details_pb2, status_pb2

from ..registry.schema import Capability, Model, Registry
from ..runtime.errors import DOMAIN
from .certs import CONTROL, ENVOY_CLIENT_SECRET, MESH_CA_SECRET, MODEL_SERVER, CertStore
from .descriptors import aimesh_files
from .tenancy_envoy import (
    ADMIN_CAPABILITY,
    INGEST_SERVICE_PREFIX,
    INITIAL_ADMISSION,
    INTERNAL_HEADERS,
    PUBLIC_PREFIXES,
    REASON_HEADER,
    REFUSED_HEADER,
    SERVICE_CAPABILITY,
    TENANT_SERVICE_PREFIX,
    USAGE_CAPABILITY,
    USAGE_SERVICE_PREFIX,
    jwt_filter,
    lua_filter,
    route_metadata,
    virtual_host_metadata,
)

MODEL_HEADER = "x-aimesh-model"
CONTROL_CLUSTER = "control"
ROUTE_CONFIG_NAME = "aimesh"
RETRY_ON = "unavailable,cancelled,resource-exhausted,connect-failure,refused-stream,reset"



@dataclass(frozen=True)
class TryTimeouts:
    first_byte_s: float  # per_try_timeout: until the server's first message (its headers)
    idle_s: float  # per_try_idle_timeout: between two messages (and before the first)


# How long one attempt may go without an answer before Envoy tries the next pool too.
# First byte = the server's queue for a slot (AIMESH_QUEUE_TIMEOUT_S, 2 s) + the engine's
# first output on a loaded 2-core machine: text, embeddings, speech synthesis and OCR
# answer (or send their first piece) in well under a second when idle; one diffusion step
# or a whole audio file transcribed in one go takes tens of seconds. Reaching it hedges
# (the slow attempt keeps running and the first answer wins), so a slow server costs
# nothing and a hung one costs this timeout. The idle timeout resets the attempt: it ends
# a stream whose server stopped mid-way (the caller has part of the answer, so it cannot
# be retried) long before the route's timeout, and is sized well above the first byte:
# it also runs before the first message, where it must not cut a slow live server.
TRY_TIMEOUTS: dict[Capability, TryTimeouts] = {
    Capability.TEXT_GENERATION: TryTimeouts(first_byte_s=8, idle_s=60),
    Capability.EMBEDDING: TryTimeouts(first_byte_s=8, idle_s=60),
    Capability.TEXT_TO_SPEECH: TryTimeouts(first_byte_s=10, idle_s=60),
    Capability.IMAGE_TO_TEXT: TryTimeouts(first_byte_s=15, idle_s=60),
    Capability.IMAGE_GENERATION: TryTimeouts(first_byte_s=30, idle_s=120),
    Capability.SPEECH_TO_TEXT: TryTimeouts(first_byte_s=30, idle_s=120),
}

# One JSON line per call; the usage collector tails it (joined with the servers' reports on
# request_id) to record calls refused at the edge.
ACCESS_LOG_FORMAT = {
    "request_id": "%REQ(X-REQUEST-ID)%",
    "time": "%START_TIME%",
    "start_ms": "%START_TIME(%s%3f)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "grpc_path": "%REQ(:PATH)%",  # the gRPC method, also of a transcoded HTTP/JSON call
    "model": "%REQ(X-AIMESH-MODEL)%",
    "served_model": "%RESP(X-AIMESH-SERVED-MODEL)%",
    "pool": "%RESP(X-AIMESH-POOL)%",
    "served_version": "%RESP(X-AIMESH-SERVED-VERSION)%",
    "tenant": "%REQ(X-AIMESH-TENANT)%",
    "token_id": "%REQ(X-AIMESH-TOKEN-ID)%",
    "reason": "%RESP(X-AIMESH-REASON)%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "trace_id": "%REQ(TRACEPARENT)%",
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
    # False: no jwt_authn and no admission (the benchmark baseline; `aimesh up --no-tenancy`).
    tenancy: bool = True
    # /readyz is forwarded to this loopback port (status.ReadinessServer); 0: none runs.
    readiness_port: int = 0
    # OTLP/gRPC collector (host:port) for Envoy's spans; "": tracing off.
    otlp_endpoint: str = ""
    trace_sample_ratio: float = 1.0  # share of new traces (a caller's sampled traceparent wins)
    # Mutual TLS to model servers and control, with the certificates of this folder
    # (mesh.certs); None: plaintext upstreams.
    mesh_certs: Path | None = None
    # The front door's own certificate and key (PEM files); None: plaintext listener.
    front_tls: tuple[Path, Path] | None = None

    @property
    def eds_dir(self) -> Path:
        return self.state_dir / "eds"

    @property
    def descriptor_path(self) -> Path:
        return self.state_dir / "descriptors.pb"

    def eds_path(self, model: Model) -> Path:
        return self.eds_dir / f"{model.cluster}.yaml"

    @property
    def routes_path(self) -> Path:
        return self.state_dir / "rds" / "routes.yaml"

    @property
    def jwt_config_path(self) -> Path:
        return self.state_dir / "ecds" / "jwt_authn.yaml"


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


def _sds_file(path: Path) -> dict[str, Any]:
    """File-based SDS: Envoy re-reads the secret when a file is renamed into its folder."""
    return {"resource_api_version": "V3", "path_config_source": {
        "path": str(path), "watched_directory": {"path": str(path.parent)}}}


def upstream_tls(spec: MeshSpec, peer: str) -> dict[str, Any]:
    """With mesh_certs: Envoy calls `peer` (an identity of mesh.certs) over mutual TLS, with
    its client certificate and the mesh CA bundle from SDS files (a rotation applies without
    a restart), and accepts only a certificate naming that identity. Health checks use the
    cluster's transport socket, so they are mutual TLS too."""
    if spec.mesh_certs is None:
        return {}
    store = CertStore(spec.mesh_certs)
    return {"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": _typed(
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        sni=peer,
        common_tls_context={
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [{
                "name": ENVOY_CLIENT_SECRET, "sds_config": _sds_file(store.sds_path(ENVOY_CLIENT_SECRET))}],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": [
                    {"san_type": "DNS", "matcher": {"exact": peer}}]},
                "validation_context_sds_secret_config": {
                    "name": MESH_CA_SECRET, "sds_config": _sds_file(store.sds_path(MESH_CA_SECRET))},
            },
        })}}


def front_door_tls(spec: MeshSpec) -> dict[str, Any]:
    """With front_tls: the listener serves TLS with the given certificate; ALPN offers h2
    (gRPC) and http/1.1 (curl, browsers)."""
    if spec.front_tls is None:
        return {}
    cert, key = spec.front_tls
    return {"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": _typed(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        common_tls_context={
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificates": [{"certificate_chain": {"filename": str(cert)},
                                  "private_key": {"filename": str(key)}}],
        })}}


def model_cluster(spec: MeshSpec, model: Model) -> dict[str, Any]:
    return {
        "name": model.cluster,
        "type": "EDS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _http2(),
        **upstream_tls(spec, MODEL_SERVER),
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
            # Only gateway failures eject: UNAVAILABLE / DEADLINE_EXCEEDED answers (503/504),
            # refused connections, resets and timeouts, i.e. a server that fails whatever it
            # is sent. INTERNAL (500) is what an input the engine cannot process gets: a
            # caller repeating such an input must not eject every host of a pool, so 5xx
            # are counted but never enforced. A whole pool may still be ejected (100%):
            # that is how a dead pool hands its calls to the next one of the chain.
            "consecutive_5xx": 3,
            "enforcing_consecutive_5xx": 0,
            "enforcing_success_rate": 0,
            "consecutive_gateway_failure": 3,
            "enforcing_consecutive_gateway_failure": 100,
            # Refused connections, resets and timeouts (errors Envoy sees itself) count on
            # their own, and two in a row eject the host at once: a killed server is out
            # before the call's retry picks a host, so the retry reaches the next pool
            # (with a single pool of one dead host, retries otherwise kept choosing it).
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 2,
            "enforcing_consecutive_local_origin_failure": 100,
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
        **upstream_tls(spec, CONTROL),
        "load_assignment": {
            "cluster_name": CONTROL_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": spec.control_port}}}}]}],
        },
    }


def _retry_policy(capability: Capability) -> dict[str, Any]:
    """At most 3 attempts per call, Envoy's and the SDK's together (MAX_ATTEMPTS_PER_CALL):
    Envoy retries a call's first attempt up to twice (along the fallback chain), and never
    an attempt that is itself a client's retry (gRPC marks those with
    `grpc-previous-rpc-attempts`); the SDK makes at most 2 attempts, and none after Envoy
    made 3 (the Lua filter answers those failures with "don't retry":
    tenancy_envoy._LUA_ATTEMPT_CAP). With a single Envoy retry, Envoy 1.40 sometimes sent
    it back to a just-killed primary instead of the next priority
    (tests/mesh/test_consul_mesh.py failed 4 runs in 10). An attempt past
    its first-byte timeout (TRY_TIMEOUTS) is hedged onto the next pool (see the route's
    hedge_policy)."""
    timeouts = TRY_TIMEOUTS[capability]
    return {
        "retry_on": RETRY_ON,
        "num_retries": 2,
        "per_try_timeout": _duration(timeouts.first_byte_s),
        "per_try_idle_timeout": _duration(timeouts.idle_s),
        "retriable_request_headers": [{"name": "grpc-previous-rpc-attempts", "present_match": False}],
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


def _model_route(spec: MeshSpec, service: str, model: Model, by_header: bool,
                 version: int) -> dict[str, Any]:
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
            "retry_policy": _retry_policy(model.capability),
            "hedge_policy": {"hedge_on_per_try_timeout": True},
        },
        "typed_per_filter_config": {BUFFER_FILTER: body_limit(service, model.capability)},
        "metadata": route_metadata(SERVICE_CAPABILITY.get(service, ""), model.id, False, version),
    }


MiB = 1024 * 1024
# The largest request (gRPC-framed bytes, after the transcoder) the front door takes per
# capability: text tiny, an embedding batch a few MiB, images and audio files large. A
# service with a client-streaming method (live audio) is not buffered, which would stop
# it being live: each of its messages is bounded by the server's message size limit.
BODY_LIMITS: dict[Capability, int] = {
    Capability.TEXT_GENERATION: 1 * MiB,
    Capability.TEXT_TO_SPEECH: 1 * MiB,
    Capability.EMBEDDING: 8 * MiB,
    Capability.IMAGE_GENERATION: 32 * MiB,
    Capability.IMAGE_TO_TEXT: 32 * MiB,
    Capability.SPEECH_TO_TEXT: 32 * MiB,
}
# An HTTP/JSON body carries bytes as base64 (4/3 larger) before the transcoder turns it
# into gRPC; the per-route limits then apply to the gRPC bytes.
HTTP_JSON_BODY_LIMIT = 48 * MiB
BUFFER_FILTER = "envoy.filters.http.buffer"
BUFFER_PER_ROUTE = "envoy.extensions.filters.http.buffer.v3.BufferPerRoute"


def client_streaming_services() -> set[str]:
    return {s.full_name for f in aimesh_files() for s in f.services_by_name.values()
            if any(m.client_streaming for m in s.methods)}


def body_limit(service: str, capability: Capability) -> dict[str, Any]:
    """The buffer filter's per-route config: a body over the limit is answered 413 /
    INVALID_ARGUMENT REQUEST_TOO_LARGE (too_large_mappers) before it reaches a server."""
    if service in client_streaming_services():
        return _typed(BUFFER_PER_ROUTE, disabled=True)
    return _typed(BUFFER_PER_ROUTE, buffer={"max_request_bytes": BODY_LIMITS[capability]})


JOBS_SERVICE_PREFIX = "/aimesh.jobs.v1.JobService/"


def _control_route(prefix: str, capability: str, public: bool, version: int) -> dict[str, Any]:
    # Not buffered: reflection is a bidirectional stream (buffered, it would wait for an end
    # of request that never comes); the control server's message limit bounds its calls.
    return {"match": {"prefix": prefix}, "route": {"cluster": CONTROL_CLUSTER, "timeout": "30s"},
            "typed_per_filter_config": {BUFFER_FILTER: _typed(BUFFER_PER_ROUTE, disabled=True)},
            "metadata": route_metadata(capability, "", public, version)}


HEALTHZ_PATH, READYZ_PATH = "/healthz", "/readyz"
READINESS_CLUSTER = "readiness"


def probe_routes(spec: MeshSpec, version: int) -> list[dict[str, Any]]:
    """Load balancers' probes, public (PUBLIC_PREFIXES): Envoy answers /healthz itself (it
    runs); /readyz goes to the readiness server of `aimesh up` (200 when every model has a
    healthy endpoint, else 503 naming those without one)."""
    public = route_metadata("", "", True, version)
    readyz: dict[str, Any] = (
        {"route": {"cluster": READINESS_CLUSTER, "timeout": "5s"}} if spec.readiness_port else
        {"direct_response": {"status": 503, "body": {"inline_string": "no readiness server runs\n"}}})
    return [
        {"match": {"prefix": HEALTHZ_PATH}, "metadata": public,
         "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}},
        {"match": {"prefix": READYZ_PATH}, "metadata": public, **readyz},
    ]


def readiness_clusters(spec: MeshSpec) -> list[dict[str, Any]]:
    if not spec.readiness_port:
        return []
    return [{
        "name": READINESS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": READINESS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": spec.readiness_port}}}}]}],
        },
    }]


def routes(spec: MeshSpec, version: int = INITIAL_ADMISSION["version"]) -> list[dict[str, Any]]:
    """Every route, each with its constants and the admission state's `version` in its metadata."""
    out: list[dict[str, Any]] = [
        *probe_routes(spec, version),
        *(_control_route(prefix, "", True, version) for prefix in PUBLIC_PREFIXES
          if prefix not in (HEALTHZ_PATH, READYZ_PATH)),
        _control_route(TENANT_SERVICE_PREFIX, ADMIN_CAPABILITY, False, version),
        _control_route(USAGE_SERVICE_PREFIX, USAGE_CAPABILITY, False, version),
        # Any valid token: JobService checks each job's capability against the token's scopes.
        # No route timeout: a WatchJob stream lasts as long as its job (callers set deadlines).
        {**_control_route(JOBS_SERVICE_PREFIX, USAGE_CAPABILITY, False, version),
         "route": {"cluster": CONTROL_CLUSTER, "timeout": "0s"}},
        # Servers report usage to the control plane directly; never from the front door.
        {"match": {"prefix": INGEST_SERVICE_PREFIX}, "direct_response": {
            "status": 404, "body": {"inline_string": "usage ingest is internal to the mesh\n"}}},
    ]
    defaults: set[str] = set()
    for model in spec.registry.models:
        for service in model.services:
            out.append(_model_route(spec, service, model, True, version))
    for model in spec.registry.models:
        for service in model.services:
            if service not in defaults:  # the first model of a capability is its default
                defaults.add(service)
                out.append(_model_route(spec, service, model, False, version))
    # Any other aimesh call names a model that does not exist: control answers NOT_FOUND.
    out.append(_control_route("/aimesh.", "", False, version))
    out.append({"match": {"prefix": "/"}, "direct_response": {
        "status": 404, "body": {"inline_string": "no such aimesh route; see GET /v1/models\n"}}})
    return out


def route_configuration(spec: MeshSpec, admission: dict[str, Any]) -> dict[str, Any]:
    """The RDS resource: every route, and the admission state in the virtual host's metadata."""
    return {
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": ROUTE_CONFIG_NAME,
        "virtual_hosts": [{"name": "aimesh", "domains": ["*"],
                           "metadata": virtual_host_metadata(admission),
                           # x-envoy-attempt-count on responses: the attempt cap reads it.
                           "include_attempt_count_in_response": True,
                           "routes": routes(spec, int(admission["version"]))}],
    }


# Headers by which a request steers Envoy's router (timeouts, retries, hedging, stats,
# tracing). `use_remote_address` makes Envoy drop them from callers it deems external,
# but which addresses are internal has changed between Envoy versions (RFC 1918 and
# loopback used to be): the front door drops them from every caller itself.
ENVOY_CONTROL_HEADERS = (
    "x-envoy-max-retries", "x-envoy-retry-on", "x-envoy-retry-grpc-on",
    "x-envoy-retriable-status-codes", "x-envoy-retriable-header-names",
    "x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response", "x-envoy-expected-rq-timeout-ms",
    "x-envoy-upstream-stream-duration-ms", "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-is-timeout-retry", "x-envoy-attempt-count", "x-envoy-upstream-alt-stat-name",
    "x-envoy-force-trace", "x-envoy-ip-tags", "x-envoy-decorator-operation",
    "x-envoy-internal", "x-envoy-external-address", "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node", "x-envoy-immediate-health-check-fail",
)


def http_filters(spec: MeshSpec, services: list[str]) -> list[dict[str, Any]]:
    return [
        {"name": "envoy.filters.http.header_mutation", "typed_config": _typed(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            mutations={"request_mutations": [
                {"remove": h} for h in (*INTERNAL_HEADERS, *ENVOY_CONTROL_HEADERS)]})},
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
            max_request_body_size=HTTP_JSON_BODY_LIMIT,
        )},
        *([jwt_filter(spec)] if spec.tenancy else []),
        lua_filter(spec.tenancy),
        # Last before the router: the route (and its body limit, body_limit) is known by then
        # (the Lua filter may have changed it), and an oversized call is refused before any
        # upstream sees a byte of it. Routes without a limit of their own get the smallest.
        {"name": BUFFER_FILTER, "typed_config": _typed(
            "envoy.extensions.filters.http.buffer.v3.Buffer",
            max_request_bytes=min(BODY_LIMITS.values()))},
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
    status = status_pb2.Status(code=error_model.TABLE["MODEL_UNAVAILABLE"].code, message=message)
    status.details.add().Pack(info)
    return message, status


# jwt_authn refuses with 401 (no token, expired, unknown key, bad signature) or 403 (a
# token for another audience): all of them mean "no
# valid credential for this mesh", so all become UNAUTHENTICATED / 401.
_TOKEN_HELP = "this call needs a valid token from a trusted issuer (Authorization: Bearer <jwt>)"


def _token_refusal_mappers() -> list[dict[str, Any]]:
    """jwt_authn's refusals in AIP-193 form (ErrorInfo reason UNAUTHENTICATED, and
    x-aimesh-reason for the access log). Over HTTP/JSON the message keeps jwt_authn's own
    words ("Jwt is expired"); over gRPC, grpc-message is the Status's general message, as
    the details are static and clients (grpcio-status) refuse a Status whose message
    differs from grpc-message."""
    refused = {"or_filter": {"filters": [
        {"status_code_filter": {"comparison": {
            "op": "EQ", "value": {"default_value": code, "runtime_key": "aimesh.token_refusal"}}}}
        for code in (401, 403)]}}
    from_jwt_authn = {"header_filter": {"header": {"name": REFUSED_HEADER, "present_match": False}}}
    from_http = {"header_filter": {"header": {"name": "x-envoy-original-path", "present_match": True}}}
    reason = "UNAUTHENTICATED"
    row = error_model.TABLE[reason]
    status = status_pb2.Status(code=row.code, message=_TOKEN_HELP)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    reason_header = {"header": {"key": REASON_HEADER, "value": reason},
                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
    return [
        {
            "filter": {"and_filter": {"filters": [refused, from_jwt_authn, from_http]}},
            "status_code": row.http_status,
            "headers_to_add": [reason_header],
            "body_format_override": {
                "json_format": {"code": row.code, "message": "%LOCAL_REPLY_BODY%", "details": [
                    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                     "domain": DOMAIN, "metadata": {}}]},
                "content_type": "application/json"},
        },
        {
            "filter": {"and_filter": {"filters": [refused, from_jwt_authn]}},
            "status_code": row.http_status,
            "headers_to_add": [reason_header, {
                "header": {"key": "grpc-status-details-bin",
                           "value": base64.b64encode(status.SerializeToString()).decode().rstrip("=")},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
            # grpc-message must say what the Status says, or clients (grpcio-status) reject
            # the details.
            "body": {"inline_string": _TOKEN_HELP},
        },
    ]


def _grpc_status_headers(status: status_pb2.Status) -> list[dict[str, Any]]:
    """A gRPC local reply's status from the table (Envoy would derive one from the HTTP
    status) and its details."""
    return [{"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for key, value in (("grpc-status", str(status.code)), ("grpc-status-details-bin", (
                base64.b64encode(status.SerializeToString()).decode().rstrip("="))))]


def too_large_mappers(spec: MeshSpec) -> list[dict[str, Any]]:
    """The buffer filter's 413 becomes REQUEST_TOO_LARGE naming the capability's limit:
    HTTP 413 with a JSON google.rpc.Status, or INVALID_ARGUMENT with ErrorInfo over gRPC."""
    row = error_model.TABLE["REQUEST_TOO_LARGE"]
    too_large = {"status_code_filter": {"comparison": {
        "op": "EQ", "value": {"default_value": 413, "runtime_key": "aimesh.too_large"}}}}
    from_http = {"header_filter": {"header": {"name": "x-envoy-original-path", "present_match": True}}}
    capabilities = {service: model.capability for model in spec.registry.models
                    for service in model.services}
    mappers: list[dict[str, Any]] = []
    for service, capability in sorted(capabilities.items()):
        if service in client_streaming_services():
            continue
        limit = BODY_LIMITS[capability]
        message = (f"the request is larger than the {limit / MiB:g} MiB the front door accepts "
                   f"for {capability.value}")
        metadata = {"limit_bytes": str(limit), "capability": capability.value}
        status = status_pb2.Status(code=row.code, message=message)
        status.details.add().Pack(error_details_pb2.ErrorInfo(
            reason="REQUEST_TOO_LARGE", domain=DOMAIN, metadata=metadata))
        this_service = {"header_filter": {"header": {
            "name": ":path", "string_match": {"prefix": f"/{service}/"}}}}
        mappers.append({
            "filter": {"and_filter": {"filters": [too_large, this_service, from_http]}},
            "status_code": row.http_status,
            "body_format_override": {"json_format": {"code": row.code, "message": message, "details": [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "REQUEST_TOO_LARGE",
                 "domain": DOMAIN, "metadata": metadata}]}, "content_type": "application/json"},
        })
        mappers.append({
            "filter": {"and_filter": {"filters": [too_large, this_service]}},
            "headers_to_add": _grpc_status_headers(status),
            "body": {"inline_string": message},
        })
    return mappers


OVERLOADED_MESSAGE = ("the front door is over its memory limit and takes no new calls for now; "
                      "retry shortly, or through another front door")


def overload_mappers() -> list[dict[str, Any]]:
    """The overload manager's refusal (response flag OM, 503) in AIP-193 form: reason
    SERVER_NOT_READY, so callers and load balancers try again elsewhere."""
    row = error_model.TABLE["SERVER_NOT_READY"]
    status = status_pb2.Status(code=row.code, message=OVERLOADED_MESSAGE)
    status.details.add().Pack(error_details_pb2.ErrorInfo(
        reason="SERVER_NOT_READY", domain=DOMAIN, metadata={"overloaded": "front_door"}))
    overloaded = {"response_flag_filter": {"flags": ["OM"]}}
    from_http = {"header_filter": {"header": {"name": "x-envoy-original-path", "present_match": True}}}
    return [
        {"filter": {"and_filter": {"filters": [overloaded, from_http]}},
         "status_code": row.http_status,
         "body_format_override": {"json_format": {"code": row.code, "message": OVERLOADED_MESSAGE, "details": [
             {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "SERVER_NOT_READY",
              "domain": DOMAIN, "metadata": {"overloaded": "front_door"}}]}, "content_type": "application/json"}},
        {"filter": overloaded, "headers_to_add": _grpc_status_headers(status),
         "body": {"inline_string": OVERLOADED_MESSAGE}},
    ]


def local_reply_mappers(spec: MeshSpec) -> list[dict[str, Any]]:
    """Envoy's own 'no healthy upstream' becomes AIP-193: UNAVAILABLE + ErrorInfo naming the
    model, as grpc-status-details-bin for gRPC callers and a google.rpc.Status JSON body over
    HTTP; so do jwt_authn's refusals."""
    mappers = [*too_large_mappers(spec), *overload_mappers(),
               *(_token_refusal_mappers() if spec.tenancy else [])]
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
                    "code": status.code, "message": message,
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


OTLP_CLUSTER = "otlp"


def otlp_cluster(spec: MeshSpec) -> dict[str, Any]:
    host, _, port = spec.otlp_endpoint.rpartition(":")
    return {
        "name": OTLP_CLUSTER,
        "type": "STRICT_DNS",  # a host name (a collector in compose) or an address
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _http2(),
        "load_assignment": {
            "cluster_name": OTLP_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": host, "port_value": int(port)}}}}]}],
        },
    }


def tracing(spec: MeshSpec) -> dict[str, Any]:
    """Envoy's OpenTelemetry tracer: it continues a caller's `traceparent` (or starts a
    trace, sampled at `trace_sample_ratio`), and with spawn_upstream_span each upstream
    attempt is a span of its own, the parent the server sees: a retry or hedge onto the
    next pool (a fallback) shows as a second attempt span in the same trace."""
    return {
        "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": _typed(
            "envoy.config.trace.v3.OpenTelemetryConfig",
            grpc_service={"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "1s"},
            service_name="aimesh-front-door")},
        "random_sampling": {"value": 100 * spec.trace_sample_ratio},
        "spawn_upstream_span": True,
    }


ENVOY_MAX_HEAP_BYTES = 1024 * MiB
MAX_DOWNSTREAM_CONNECTIONS = 10_000
# Heap use (share of ENVOY_MAX_HEAP_BYTES) at which Envoy acts: give memory back to the
# system, then stop keep-alive so callers spread to other front doors, then answer new
# requests 503 (UNAVAILABLE: the SDK and load balancers try elsewhere) instead of dying.
OVERLOAD_ACTIONS = {
    "envoy.overload_actions.shrink_heap": 0.90,
    "envoy.overload_actions.disable_http_keepalive": 0.92,
    "envoy.overload_actions.stop_accepting_requests": 0.95,
}
HEAP_MONITOR = "envoy.resource_monitors.fixed_heap"


def overload_manager() -> dict[str, Any]:
    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {"name": HEAP_MONITOR, "typed_config": _typed(
                "envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                max_heap_size_bytes=ENVOY_MAX_HEAP_BYTES)},
            # Connections past this many are closed at accept, across all listeners.
            {"name": "envoy.resource_monitors.global_downstream_max_connections", "typed_config": _typed(
                "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS)},
        ],
        "actions": [{"name": action, "triggers": [{"name": HEAP_MONITOR, "threshold": {"value": at}}]}
                    for action, at in OVERLOAD_ACTIONS.items()],
    }


def bootstrap(spec: MeshSpec, services: list[str]) -> dict[str, Any]:
    hcm = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="aimesh",
        codec_type="AUTO",
        # Routes from a file (RDS) so the admission state in their metadata changes at runtime.
        rds={"route_config_name": ROUTE_CONFIG_NAME, "config_source": {
            "resource_api_version": "V3", "path_config_source": {
                "path": str(spec.routes_path),
                "watched_directory": {"path": str(spec.routes_path.parent)}}}},
        http_filters=http_filters(spec, services),
        # This is the edge: the peer's address is the caller's, and none of a caller's
        # x-envoy-* or x-request-id headers is trusted (the request id is regenerated, as
        # usage records join on it).
        use_remote_address=True,
        xff_num_trusted_hops=0,
        # A caller's streams, flow-control windows (Envoy's default is 256 MiB per stream)
        # and headers are bounded; bodies per capability (BODY_LIMITS).
        http2_protocol_options={"max_concurrent_streams": 128,
                                "initial_stream_window_size": 1 * MiB,
                                "initial_connection_window_size": 4 * MiB},
        max_request_headers_kb=32,
        common_http_protocol_options={"max_headers_count": 100},
        access_log=[{"name": "envoy.access_loggers.file", "typed_config": _typed(
            "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            path=str(spec.state_dir / "access.log"),
            log_format={"json_format": ACCESS_LOG_FORMAT})}],
        # Streams (tokens, audio) can run long; the route timeout bounds them instead.
        stream_idle_timeout="300s",
        local_reply_config={"mappers": local_reply_mappers(spec)},
        **({"tracing": tracing(spec)} if spec.otlp_endpoint else {}),
    )
    return {
        "node": {"id": "aimesh-front-door", "cluster": "aimesh"},
        "overload_manager": overload_manager(),
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": spec.admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "front_door",
                "address": {"socket_address": {"address": spec.listen_host, "port_value": spec.port}},
                "filter_chains": [{**front_door_tls(spec), "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
            }],
            "clusters": [control_cluster(spec), *readiness_clusters(spec),
                         *(model_cluster(spec, m) for m in spec.registry.models),
                         *([otlp_cluster(spec)] if spec.otlp_endpoint else [])],
        },
    }
