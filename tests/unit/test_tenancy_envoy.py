"""The front door's tenancy config: generated, then validated by the real Envoy binary.

`envoy --mode validate` does not read RDS or ECDS files, so the files' contents are also
validated in a bootstrap that carries them inline (same protos, same checks)."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from aimesh_servers.mesh.controller import EndpointController
from aimesh_servers.mesh.envoy_config import ACCESS_LOG_FORMAT, MeshSpec, routes
from aimesh_servers.mesh.envoy_process import envoy_binary, write_config
from aimesh_servers.mesh.tenancy_envoy import (
    INGEST_SERVICE_PREFIX,
    INTERNAL_HEADERS,
    JWT_FILTER,
    LUA_FILTER,
    PUBLIC_PREFIXES,
    JwtProvider,
    jwt_authentication,
    write_jwt_config,
    write_routes,
)
from aimesh_servers.registry.schema import load_registry

from tests.unit.test_registry_schema import GOOD, write

JWKS = json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k1",
                             "x": "6EhF6W2mRTe29rk9jzxNs7liYMWvsI1JuoIFhPvDX2w",
                             "y": "vlglKnrnPqQkFKF5CcLJZBJ9cc2Qd9q5bSngqMdJgMg"}]})
MESH = JwtProvider("aimesh", "aimesh", ("aimesh",), JWKS)
PARTNER = JwtProvider("partner", "https://id.partner.example", ("aimesh", "partner-apps"), JWKS,
                      tenant_claim="org")
ADMISSION = {"version": 7, "enforce": True, "revoked": ["jti-1"], "tenants": {"acme": {
    "disabled": False, "capabilities": ["text"], "models": None,
    "requests": {"text": {"*": [5, 60]}, "*": {"*": [100, 60]}},
    "blocked": {"*": {"*": {"reason": "BUDGET_EXHAUSTED", "until": 1764470000,
                            "message": "monthly budget spent", "subject": "monthly budget"}}}}}}


def spec_for(tmp_path: Path, tenancy: bool = True) -> MeshSpec:
    return MeshSpec(registry=load_registry(write(tmp_path, GOOD)), state_dir=tmp_path / "state",
                    control_port=50000, tenancy=tenancy)


def validate(config: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def listener(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def inlined(config: dict[str, Any], route_file: Path, jwt_file: Path | None) -> dict[str, Any]:
    """The bootstrap with the RDS and ECDS files' resources in place of their sources."""
    config = copy.deepcopy(config)
    hcm = listener(config)
    route_config = yaml.safe_load(route_file.read_text())["resources"][0]
    route_config.pop("@type")
    del hcm["rds"]
    hcm["route_config"] = route_config
    if jwt_file:
        resource = yaml.safe_load(jwt_file.read_text())["resources"][0]
        jwt = next(f for f in hcm["http_filters"] if f["name"] == JWT_FILTER)
        del jwt["config_discovery"]
        jwt["typed_config"] = resource["typed_config"]
    return config


@pytest.mark.parametrize("providers", [[], [MESH], [MESH, PARTNER]], ids=["none", "mesh", "mesh+partner"])
def test_envoy_accepts_the_bootstrap_and_the_rds_and_ecds_files(tmp_path, providers):
    spec = spec_for(tmp_path)
    config_path = write_config(spec, EndpointController(spec, spec.registry))
    config = yaml.safe_load(config_path.read_text())
    validate(config, tmp_path / "bootstrap.yaml")
    write_routes(spec, ADMISSION)
    write_jwt_config(spec, providers)
    validate(inlined(config, spec.routes_path, spec.jwt_config_path), tmp_path / "inlined.yaml")
    assert not list(spec.routes_path.parent.glob(".*.tmp")) and not list(spec.jwt_config_path.parent.glob(".*.tmp"))


def test_without_tenancy_there_is_no_jwt_authn_and_envoy_accepts_it(tmp_path):
    spec = spec_for(tmp_path, tenancy=False)
    config = yaml.safe_load(write_config(spec, EndpointController(spec, spec.registry)).read_text())
    names = [f["name"] for f in listener(config)["http_filters"]]
    assert JWT_FILTER not in names and not spec.jwt_config_path.exists()
    validate(inlined(config, spec.routes_path, None), tmp_path / "inlined.yaml")


def test_filter_order_strips_internal_headers_first_and_verifies_after_the_transcoder(tmp_path):
    spec = spec_for(tmp_path)
    config = yaml.safe_load(write_config(spec, EndpointController(spec, spec.registry)).read_text())
    filters = listener(config)["http_filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.header_mutation", "envoy.filters.http.grpc_json_transcoder",
        JWT_FILTER, LUA_FILTER, "envoy.filters.http.buffer", "envoy.filters.http.router"]
    removed = [m["remove"] for m in filters[0]["typed_config"]["mutations"]["request_mutations"]]
    assert set(INTERNAL_HEADERS) <= set(removed)  # plus the x-envoy-* router controls
    assert {"x-aimesh-tenant", "x-aimesh-scopes", "x-aimesh-token-id", "x-aimesh-reason"} <= set(removed)
    source = filters[2]["config_discovery"]["config_source"]["path_config_source"]
    assert source["path"] == str(spec.jwt_config_path)


def test_jwt_rules_need_a_token_except_on_public_prefixes_where_one_is_still_verified():
    config = jwt_authentication([MESH, PARTNER])
    rules = config["rules"]
    assert [r["match"]["prefix"] for r in rules] == [*PUBLIC_PREFIXES, "/"]
    public = rules[0]["requires"]["requires_any"]["requirements"]
    assert public == [{"provider_name": "aimesh"}, {"provider_name": "partner"}, {"allow_missing": {}}]
    assert rules[-1]["requires"] == {"requires_any": {"requirements": [
        {"provider_name": "aimesh"}, {"provider_name": "partner"}]}}
    partner = config["providers"]["partner"]
    assert partner["issuer"] == "https://id.partner.example" and partner["audiences"] == ["aimesh", "partner-apps"]
    assert {(c["claim_name"], c["header_name"]) for c in partner["claim_to_headers"]} == {
        ("org", "x-aimesh-tenant"), ("scope", "x-aimesh-scopes"), ("jti", "x-aimesh-token-id")}
    assert jwt_authentication([MESH])["rules"][-1]["requires"] == {"provider_name": "aimesh"}


def test_with_no_provider_every_token_is_refused():
    config = jwt_authentication([])
    (provider,) = config["providers"].values()
    assert config["rules"][-1]["requires"] == {"provider_name": next(iter(config["providers"]))}
    assert len(json.loads(provider["local_jwks"]["inline_string"])["keys"]) == 1


def test_provider_names_must_be_unique():
    with pytest.raises(ValueError, match="unique"):
        jwt_authentication([MESH, MESH])


def test_routes_carry_capability_model_and_version_and_the_host_the_admission_state(tmp_path):
    spec = spec_for(tmp_path)
    write_routes(spec, ADMISSION)
    (host,) = yaml.safe_load(spec.routes_path.read_text())["resources"][0]["virtual_hosts"]
    assert host["metadata"]["filter_metadata"][LUA_FILTER] == {"admission": ADMISSION}
    table = host["routes"]
    assert table == routes(spec, 7)
    by_name = {r.get("name"): r for r in table}
    chat = by_name["chat:aimesh.text.v1.TextGenerationService"]["metadata"]["filter_metadata"][LUA_FILTER]
    assert chat == {"capability": "text", "model": "chat", "public": False, "version": 7}
    default = by_name["chat:aimesh.text.v1.TextGenerationService:default"]["metadata"]["filter_metadata"][LUA_FILTER]
    assert default["model"] == "chat"
    by_prefix = {r["match"]["prefix"]: r for r in table if "headers" not in r["match"]}
    for prefix in PUBLIC_PREFIXES:
        assert by_prefix[prefix]["metadata"]["filter_metadata"][LUA_FILTER]["public"] is True
    tenants = by_prefix["/aimesh.tenancy.v1.TenantService/"]["metadata"]["filter_metadata"][LUA_FILTER]
    usage = by_prefix["/aimesh.usage.v1.UsageService/"]["metadata"]["filter_metadata"][LUA_FILTER]
    assert (tenants["capability"], tenants["public"]) == ("admin", False)
    assert (usage["capability"], usage["public"]) == ("usage", False)
    # The servers' ingest service is answered by Envoy itself, before the catch-all to control.
    prefixes = [r["match"]["prefix"] for r in table]
    assert prefixes.index(INGEST_SERVICE_PREFIX) < prefixes.index("/aimesh.")
    assert by_prefix[INGEST_SERVICE_PREFIX]["direct_response"]["status"] == 404


def test_access_log_has_what_usage_records_join_on():
    for key, operator in [("request_id", "%REQ(X-REQUEST-ID)%"), ("tenant", "%REQ(X-AIMESH-TENANT)%"),
                          ("token_id", "%REQ(X-AIMESH-TOKEN-ID)%"), ("reason", "%RESP(X-AIMESH-REASON)%"),
                          ("details", "%RESPONSE_CODE_DETAILS%"), ("trace_id", "%REQ(TRACEPARENT)%"),
                          ("start_ms", "%START_TIME(%s%3f)%"),
                          ("served_version", "%RESP(X-AIMESH-SERVED-VERSION)%"),
                          ("attempts", "%UPSTREAM_REQUEST_ATTEMPT_COUNT%")]:
        assert ACCESS_LOG_FORMAT[key] == operator
