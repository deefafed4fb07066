"""The registry's live figures per model and pool (status.LiveFigures) from an access log
in Envoy's format: incremental reads, the window, fallbacks, cost from a cost source."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from aimesh_servers.mesh.envoy_config import ACCESS_LOG_FORMAT
from aimesh_servers.mesh.status import LiveFigures
from aimesh_servers.registry.schema import load_registry

REGISTRY = """
kind: aimesh/registry/v1
models:
  - id: chat
    capability: text_generation
    versions: [{version: "1", source: "builtin:smollm2-135m-instruct"}]
    pools:
      - {id: primary, serve: text}
      - {id: secondary, serve: text}
"""


def line(age_s: float, duration_ms: int, pool: str = "primary", grpc_status: str = "OK",
         attempts: int = 1) -> str:
    call = dict.fromkeys(ACCESS_LOG_FORMAT, "-")
    call.update(start_ms=str(int((time.time() - age_s) * 1000)), duration_ms=duration_ms, pool=pool,
                grpc_status=grpc_status, http_status=200, cluster="model_chat", attempts=attempts,
                path="/aimesh.text.v1.TextGenerationService/Generate",
                grpc_path="/aimesh.text.v1.TextGenerationService/Generate")
    return json.dumps(call) + "\n"


@pytest.fixture
def registry(tmp_path: Path):
    (tmp_path / "registry.yaml").write_text(REGISTRY)
    return load_registry(tmp_path / "registry.yaml")


def test_figures_per_pool_and_for_the_model(registry, tmp_path: Path):
    log = tmp_path / "access.log"
    log.write_text(line(400, 9999)  # older than the window
                   + "".join(line(10, ms) for ms in (10, 20, 30, 40))
                   + line(5, 50, attempts=2)  # retried onto the first pool: a fallback too
                   + line(5, 300, pool="secondary")
                   + line(4, 7, pool="-", grpc_status="Unavailable"))
    costs = {("chat", "primary"): 0.25, ("chat", "secondary"): 0.5}
    live = LiveFigures(registry, log, window_s=300, cost=lambda window_s: costs).snapshot()["chat"]
    primary, secondary = live.pools["primary"], live.pools["secondary"]
    assert (primary.calls, primary.p50_ms, primary.p95_ms) == (5, 30, 50)
    assert primary.fallback_rate == 0.2 and primary.error_rate == 0 and primary.cost_usd == 0.25
    assert (secondary.calls, secondary.fallback_rate, secondary.cost_usd) == (1, 1.0, 0.5)
    assert live.total.calls == 7 and live.total.error_rate == round(1 / 7, 4)
    assert live.total.fallback_rate == round(2 / 6, 4)  # of the calls a pool served
    assert live.total.cost_usd == 0.75 and live.total.calls_per_s == round(7 / 300, 4)


def test_reads_only_new_lines_and_caches(registry, tmp_path: Path):
    log = tmp_path / "access.log"
    log.write_text(line(3, 10) + '{"start_ms": "cut')  # a line Envoy is still writing
    live = LiveFigures(registry, log, window_s=60, cache_s=3600)
    assert live.snapshot()["chat"].total.calls == 1
    with open(log, "a") as out:
        out.write("\n" + line(2, 20))  # ends the cut line (still not JSON), then a new call
    assert live.snapshot()["chat"].total.calls == 1  # cached
    live.cache_s = 0
    assert live.snapshot()["chat"].total.calls == 2  # the cut line never counts; the new one does


def test_a_new_log_file_is_read_from_its_start(registry, tmp_path: Path):
    log = tmp_path / "access.log"
    log.write_text(line(3, 10) + line(3, 10))
    live = LiveFigures(registry, log, window_s=60, cache_s=0)
    assert live.snapshot()["chat"].total.calls == 2
    log.unlink()
    log.write_text(line(1, 10))
    assert live.snapshot()["chat"].total.calls == 3  # the calls of the old file stay in the window


def test_no_log_no_calls(registry, tmp_path: Path):
    live = LiveFigures(registry, tmp_path / "missing.log").snapshot()["chat"]
    assert live.total.calls == 0 and live.total.p95_ms is None and live.pools["primary"].calls == 0
