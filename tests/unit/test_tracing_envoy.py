"""Envoy's tracer in the generated config: only with an OTLP endpoint, validated by the real
Envoy binary."""

from __future__ import annotations

import yaml
from aimesh_servers.mesh.controller import EndpointController
from aimesh_servers.mesh.envoy_config import OTLP_CLUSTER, MeshSpec, bootstrap
from aimesh_servers.mesh.envoy_process import validate, write_config
from aimesh_servers.registry.schema import load_registry

from tests.conftest import ROOT


def hcm(config: dict) -> dict:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def test_no_tracer_and_no_otlp_cluster_without_an_endpoint(tmp_path):
    config = bootstrap(MeshSpec(registry=load_registry(), state_dir=tmp_path, control_port=50000), [])
    assert "tracing" not in hcm(config)
    assert OTLP_CLUSTER not in [c["name"] for c in config["static_resources"]["clusters"]]


def test_envoy_accepts_the_opentelemetry_tracer_with_a_span_per_upstream_attempt(tmp_path):
    spec = MeshSpec(registry=load_registry(), state_dir=tmp_path, control_port=50000,
                    otlp_endpoint="collector.example:4317", trace_sample_ratio=0.25)
    config_path = write_config(spec, EndpointController(spec, spec.registry))
    validate(config_path)  # raises with Envoy's message if it rejects the config
    config = yaml.safe_load(config_path.read_text())
    tracing = hcm(config)["tracing"]
    assert tracing["provider"]["name"] == "envoy.tracers.opentelemetry"
    assert tracing["provider"]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == OTLP_CLUSTER
    assert tracing["spawn_upstream_span"] is True
    assert tracing["random_sampling"] == {"value": 25.0}
    otlp = next(c for c in config["static_resources"]["clusters"] if c["name"] == OTLP_CLUSTER)
    address = otlp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "collector.example", "port_value": 4317}


def test_compose_sends_envoys_and_every_servers_spans_to_jaeger():
    services = yaml.safe_load((ROOT / "compose.yml").read_text())["services"]
    command = services["mesh"]["command"]
    assert command[command.index("--otlp") + 1] == "jaeger:4317"
    assert services["text"]["environment"]["AIMESH_OTLP_ENDPOINT"] == "jaeger:4317"
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
