"""The generated Envoy config: validated by the real Envoy binary, chains as priorities."""

from __future__ import annotations

import subprocess

import yaml
from aimesh_servers.mesh.controller import EndpointController, load_assignment
from aimesh_servers.mesh.envoy_config import MeshSpec, bootstrap, routes
from aimesh_servers.mesh.envoy_process import envoy_binary, write_config
from aimesh_servers.registry.discovery import Instance
from aimesh_servers.registry.schema import load_registry

from tests.unit.test_registry_schema import GOOD, write


def instance(pool: str, port: int, model: str = "chat") -> Instance:
    return Instance(id=f"{model}-{pool}-{port}", address="127.0.0.1", port=port, model=model,
                    pool=pool, version="1", grpc_service="aimesh.text.v1.TextGenerationService")


def test_envoy_accepts_the_generated_config_for_the_default_registry(tmp_path):
    spec = MeshSpec(registry=load_registry(), state_dir=tmp_path, control_port=50000)
    config = write_config(spec, EndpointController(spec, spec.registry))
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_pools_become_fixed_priorities_in_chain_order(tmp_path):
    chat = load_registry(write(tmp_path, GOOD)).get("chat")
    both = load_assignment(chat, [instance("cloud", 2), instance("primary", 1), instance("primary", 3)])
    groups = both["resources"][0]["endpoints"]
    assert [(g["priority"], g["locality"]["zone"]) for g in groups] == [(0, "primary"), (1, "cloud")]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in groups[0]["lb_endpoints"]] == [1, 3]
    # An empty pool keeps its level, so the cloud server stays at priority 1 as others come and go.
    only_cloud = load_assignment(chat, [instance("cloud", 2), instance("primary", 9, model="other")])
    groups = only_cloud["resources"][0]["endpoints"]
    assert [(g["priority"], g["locality"]["zone"], len(g["lb_endpoints"])) for g in groups] == [
        (0, "primary", 0), (1, "cloud", 1)]


def test_controller_rewrites_only_changed_clusters_atomically(tmp_path):
    spec = MeshSpec(registry=load_registry(write(tmp_path, GOOD)), state_dir=tmp_path, control_port=1)
    controller = EndpointController(spec, spec.registry)
    assert controller.apply([]) == ["model_chat"]
    assert controller.apply([]) == []
    assert controller.apply([instance("primary", 7)]) == ["model_chat"]
    written = yaml.safe_load(spec.eds_path(spec.registry.models[0]).read_text())
    assert written["resources"][0]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"]["port_value"] == 7
    assert not list(spec.eds_dir.glob(".*.tmp"))


def test_routes_send_model_header_to_its_cluster_and_unknown_models_to_control(tmp_path):
    spec = MeshSpec(registry=load_registry(write(tmp_path, GOOD)), state_dir=tmp_path, control_port=1)
    table = routes(spec)
    by_name = {r.get("name"): r for r in table}
    chat = by_name["chat:aimesh.text.v1.TextGenerationService"]
    assert chat["match"]["headers"][0]["string_match"]["exact"] == "chat"
    assert chat["route"]["cluster"] == "model_chat"
    assert "previous_priorities" in chat["route"]["retry_policy"]["retry_priority"]["name"]
    assert table[-2]["match"]["prefix"] == "/aimesh." and table[-2]["route"]["cluster"] == "control"
    admin = bootstrap(spec, ["aimesh.text.v1.TextGenerationService"])["admin"]
    assert admin["address"]["socket_address"]["address"] == "127.0.0.1"


def test_routes_come_from_the_rds_file_write_config_writes(tmp_path):
    spec = MeshSpec(registry=load_registry(write(tmp_path, GOOD)), state_dir=tmp_path, control_port=1)
    config = yaml.safe_load(write_config(spec, EndpointController(spec, spec.registry)).read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert "route_config" not in hcm
    source = hcm["rds"]["config_source"]["path_config_source"]
    assert source["path"] == str(spec.routes_path)
    assert source["watched_directory"]["path"] == str(spec.routes_path.parent)
    served = yaml.safe_load(spec.routes_path.read_text())["resources"][0]
    assert served["name"] == hcm["rds"]["route_config_name"]
    assert served["virtual_hosts"][0]["routes"] == routes(spec)
    # The edge: a caller's x-envoy-* and x-request-id are not trusted.
    assert hcm["use_remote_address"] is True and hcm["xff_num_trusted_hops"] == 0


def test_each_attempt_has_per_capability_timeouts_and_a_timeout_is_retried(tmp_path):
    from aimesh_servers.mesh.envoy_config import TRY_TIMEOUTS
    from aimesh_servers.registry.schema import Capability

    assert set(TRY_TIMEOUTS) == set(Capability)
    spec = MeshSpec(registry=load_registry(), state_dir=tmp_path, control_port=1)
    seen = set()
    for route in routes(spec):
        if route.get("route", {}).get("cluster", "control") == "control":
            continue
        model = spec.registry.get(route["route"]["cluster"].removeprefix("model_"))
        policy = route["route"]["retry_policy"]
        timeouts = TRY_TIMEOUTS[model.capability]
        assert policy["per_try_timeout"] == f"{timeouts.first_byte_s:g}s"
        assert policy["per_try_idle_timeout"] == f"{timeouts.idle_s:g}s"
        assert route["route"]["hedge_policy"] == {"hedge_on_per_try_timeout": True}
        assert timeouts.idle_s > timeouts.first_byte_s  # idle resets: never before a hedge
        seen.add(model.capability)
    assert seen == set(Capability)
    text, image = TRY_TIMEOUTS[Capability.TEXT_GENERATION], TRY_TIMEOUTS[Capability.IMAGE_GENERATION]
    assert text.first_byte_s < image.first_byte_s


def test_only_gateway_failures_eject_a_host(tmp_path):
    from aimesh_servers.mesh.envoy_config import model_cluster

    spec = MeshSpec(registry=load_registry(), state_dir=tmp_path, control_port=1)
    outlier = model_cluster(spec, spec.registry.models[0])["outlier_detection"]
    # INTERNAL (an input the engine cannot process) never ejects; UNAVAILABLE, refused
    # connections and timeouts do.
    assert outlier["enforcing_consecutive_5xx"] == 0 and outlier["enforcing_success_rate"] == 0
    assert outlier["enforcing_consecutive_gateway_failure"] == 100


def test_the_front_door_drops_every_router_control_header_of_a_caller(tmp_path):
    from aimesh_servers.mesh.envoy_config import ENVOY_CONTROL_HEADERS, http_filters

    spec = MeshSpec(registry=load_registry(), state_dir=tmp_path, control_port=1)
    mutation = http_filters(spec, [])[0]["typed_config"]["mutations"]["request_mutations"]
    removed = {m["remove"] for m in mutation}
    assert {"x-envoy-max-retries", "x-envoy-retry-on", "x-envoy-upstream-rq-timeout-ms"} <= removed
    assert set(ENVOY_CONTROL_HEADERS) <= removed
    hcm = bootstrap(spec, [])["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert hcm["typed_config"]["http2_protocol_options"]["max_concurrent_streams"] == 128
