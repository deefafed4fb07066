"""`aimesh status`'s last-minute figures from an access log in Envoy's format, and the
state of an Envoy host from its admin /clusters fields."""

from __future__ import annotations

import json
from pathlib import Path

from aimesh_servers.mesh.envoy_config import ACCESS_LOG_FORMAT
from aimesh_servers.mesh.status import (
    ModelStatus,
    PoolStatus,
    add_call_stats,
    host_state,
    recent_calls,
)

NOW = 1_800_000_000.0


def line(age_s: float, duration_ms: int, pool: str = "primary", grpc_status: str = "OK",
         http_status: int = 200) -> str:
    call = dict.fromkeys(ACCESS_LOG_FORMAT, "-")
    call.update(start_ms=str(int((NOW - age_s) * 1000)), duration_ms=duration_ms, pool=pool,
                grpc_status=grpc_status, http_status=http_status, cluster="model_chat",
                path="/aimesh.text.v1.TextGenerationService/Generate",
                grpc_path="/aimesh.text.v1.TextGenerationService/Generate")
    return json.dumps(call)


def test_last_minute_calls_errors_p95_and_fallbacks(tmp_path: Path):
    log = tmp_path / "access.log"
    lines = [line(120, 5000)]  # older than a minute: not counted
    lines += [line(30, ms) for ms in range(1, 17)]  # 16 OK calls on the first pool, 1..16 ms
    lines += [line(20, 100, pool="secondary"), line(10, 200, pool="secondary")]  # fallbacks
    lines += [line(5, 3, pool="-", grpc_status="Unavailable")]  # no pool could take it
    lines += ['{"start_ms": "cut']  # a line Envoy is still writing
    log.write_text("\n".join(lines))
    calls = recent_calls(log, NOW)
    assert len(calls) == 19
    model = ModelStatus("chat", [PoolStatus("primary", 0), PoolStatus("secondary", 1)])
    add_call_stats(model, calls)
    assert model.calls == 19
    assert model.calls_per_s == round(19 / 60, 3)
    assert model.error_rate == round(1 / 19, 4)
    assert model.fallback_rate == round(2 / 18, 4)  # of the calls a pool served
    assert model.p95_ms == 200  # nearest rank: ceil(0.95 * 19) = the 19th of 19 sorted durations


def test_no_log_means_no_figures(tmp_path: Path):
    model = ModelStatus("chat", [PoolStatus("primary", 0)])
    add_call_stats(model, recent_calls(tmp_path / "missing.log", NOW))
    assert (model.calls, model.p95_ms, model.error_rate) == (0, None, 0.0)


def test_host_state_names_what_keeps_envoy_from_routing():
    assert host_state({"eds_health_status": "HEALTHY"}) == "healthy"
    assert host_state({"failed_active_health_check": True}) == "failed_health_check"
    assert host_state({"failed_outlier_check": True, "eds_health_status": "HEALTHY"}) == "ejected"
    assert host_state({"failed_active_health_check": True, "pending_active_hc": True}) == \
        "failed_health_check,pending_health_check"
