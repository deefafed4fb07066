"""The front door's limits in the generated config (body per capability, HTTP/2, overload
manager), checked in the config and by `envoy --mode validate`."""

from __future__ import annotations

import base64

import yaml
from aimesh import error_model
from aimesh_servers.mesh.controller import EndpointController
from aimesh_servers.mesh.envoy_config import (
    BODY_LIMITS,
    BUFFER_FILTER,
    ENVOY_MAX_HEAP_BYTES,
    MAX_DOWNSTREAM_CONNECTIONS,
    MeshSpec,
    client_streaming_services,
    routes,
)
from aimesh_servers.mesh.envoy_process import write_config
from aimesh_servers.mesh.tenancy_envoy import write_routes
from aimesh_servers.registry.schema import Capability, load_registry
from google.rpc import error_details_pb2, status_pb2

from tests.unit.test_tenancy_envoy import ADMISSION, inlined, listener, validate


def default_spec(tmp_path) -> MeshSpec:
    return MeshSpec(registry=load_registry(), state_dir=tmp_path / "state", control_port=50000,
                    tenancy=False)


def test_every_model_route_has_its_capabilitys_body_limit_and_live_audio_is_not_buffered(tmp_path):
    spec = default_spec(tmp_path)
    assert client_streaming_services() == {"aimesh.speech.v1.SpeechToTextService"}
    model_routes = [r for r in routes(spec) if r.get("route", {}).get("cluster", "").startswith("model_")]
    assert {m.capability for m in spec.registry.models} == set(Capability)
    for route in model_routes:
        service = route["match"]["prefix"].strip("/")
        model = spec.registry.get(route["route"]["cluster"].removeprefix("model_"))
        per_route = route["typed_per_filter_config"][BUFFER_FILTER]
        if service in client_streaming_services():
            assert per_route["disabled"] is True, route["name"]
        else:
            assert per_route["buffer"]["max_request_bytes"] == BODY_LIMITS[model.capability], route["name"]
    assert BODY_LIMITS[Capability.TEXT_GENERATION] < BODY_LIMITS[Capability.EMBEDDING] \
        < BODY_LIMITS[Capability.IMAGE_GENERATION]
    # The control server's routes carry reflection, a bidirectional stream: never buffered.
    control = [r for r in routes(spec) if r.get("route", {}).get("cluster") == "control"]
    assert control and all(r["typed_per_filter_config"][BUFFER_FILTER]["disabled"] for r in control)


def test_a_body_over_the_limit_is_answered_from_the_error_table(tmp_path):
    spec = default_spec(tmp_path)
    config = yaml.safe_load(write_config(spec, EndpointController(spec, spec.registry)).read_text())
    hcm = listener(config)
    row = error_model.TABLE["REQUEST_TOO_LARGE"]
    mappers = [m for m in hcm["local_reply_config"]["mappers"]
               if "413" in yaml.safe_dump(m["filter"]) and "x-envoy-original-path" not in yaml.safe_dump(m["filter"])]
    assert len(mappers) == 5  # every capability but live audio
    for mapper in mappers:
        headers = {h["header"]["key"]: h["header"]["value"] for h in mapper["headers_to_add"]}
        assert headers["grpc-status"] == str(row.code) == "3"
        encoded = headers["grpc-status-details-bin"]
        status = status_pb2.Status.FromString(base64.b64decode(encoded + "=" * (-len(encoded) % 4)))
        info = error_details_pb2.ErrorInfo()
        status.details[0].Unpack(info)
        assert status.message == mapper["body"]["inline_string"]  # grpcio-status checks they agree
        assert info.reason == "REQUEST_TOO_LARGE" and int(info.metadata["limit_bytes"]) in BODY_LIMITS.values()
    over_http = [m for m in hcm["local_reply_config"]["mappers"] if m.get("status_code") == 413]
    assert len(over_http) == 5 and all(m["body_format_override"]["json_format"]["code"] == row.code
                                       for m in over_http)


def test_http2_windows_headers_and_the_overload_manager(tmp_path):
    spec = default_spec(tmp_path)
    config = yaml.safe_load(write_config(spec, EndpointController(spec, spec.registry)).read_text())
    hcm = listener(config)
    assert hcm["http2_protocol_options"] == {"max_concurrent_streams": 128,
                                             "initial_stream_window_size": 1024 * 1024,
                                             "initial_connection_window_size": 4 * 1024 * 1024}
    assert hcm["max_request_headers_kb"] == 32 and hcm["common_http_protocol_options"]["max_headers_count"] == 100
    overload = config["overload_manager"]
    monitors = {m["name"]: m["typed_config"] for m in overload["resource_monitors"]}
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] == ENVOY_MAX_HEAP_BYTES
    assert monitors["envoy.resource_monitors.global_downstream_max_connections"][
        "max_active_downstream_connections"] == MAX_DOWNSTREAM_CONNECTIONS
    thresholds = [(a["name"].rsplit(".", 1)[1], a["triggers"][0]["threshold"]["value"]) for a in overload["actions"]]
    assert thresholds == [("shrink_heap", 0.90), ("disable_http_keepalive", 0.92),
                          ("stop_accepting_requests", 0.95)]
    # Its refusal (response flag OM) is AIP-193 too, with the table's code.
    row = error_model.TABLE["SERVER_NOT_READY"]
    [grpc_reply] = [m for m in hcm["local_reply_config"]["mappers"]
                    if m["filter"] == {"response_flag_filter": {"flags": ["OM"]}}]
    headers = {h["header"]["key"]: h["header"]["value"] for h in grpc_reply["headers_to_add"]}
    assert headers["grpc-status"] == str(row.code) and row.http_status == 503
    write_routes(spec, ADMISSION)
    validate(inlined(config, spec.routes_path, None), tmp_path / "inlined.yaml")
