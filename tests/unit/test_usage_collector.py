"""The usage collector's join (server reports + Envoy access log lines -> one record per
call) and the quota controller's admission state, on real objects: the built-in
registry, in-memory counters, records as the servers and Envoy produce them."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from aimesh.usage.v1 import usage_pb2
from aimesh_servers.registry.schema import load_registry
from aimesh_servers.tenancy.collector import UsageCollector, cost_usd, counted_units
from aimesh_servers.tenancy.counters import MemoryCounters
from aimesh_servers.tenancy.quota import LimitRule, QuotaController, Snapshot, TenantPolicy
from aimesh_servers.tenancy.recorder import UsageRow

TEXT = "aimesh.text.v1.TextGenerationService"


def report(request_id: str, status: str = "OK", pool: str = "local", units=(40, 8)) -> usage_pb2.UsageRecord:
    record = usage_pb2.UsageRecord(
        request_id=request_id, tenant="acme", service=TEXT, method="Generate",
        requested_model="smollm2-135m", served_model="smollm2-135m", served_version="1", pool=pool,
        unit="tokens", input_units=units[0], output_units=units[1], status=status, origin="server")
    record.time.FromDatetime(datetime.now(UTC))
    record.duration.FromMilliseconds(120)
    record.time_to_first_output.FromMilliseconds(30)
    return record


def edge(request_id: str, **fields: object) -> dict[str, object]:
    line = {"request_id": request_id, "start_ms": str(int(time.time() * 1000)), "tenant": "acme",
            "path": f"/{TEXT}/Generate", "grpc_path": f"/{TEXT}/Generate", "model": "smollm2-135m",
            "cluster": "model_smollm2-135m", "upstream": "127.0.0.1:5000", "grpc_status": "OK",
            "http_status": 200, "flags": "-", "attempts": 1, "duration_ms": 130, "reason": None,
            "trace_id": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    line.update(fields)
    return line


@pytest.fixture
def collected() -> tuple[UsageCollector, list[UsageRow], list[tuple[UsageRow, float]]]:
    rows: list[UsageRow] = []
    charges: list[tuple[UsageRow, float]] = []
    collector = UsageCollector(load_registry(None), rows.append,
                               lambda row, units: charges.append((row, units)), join_window_s=0.2)
    yield collector, rows, charges
    collector.close()


def test_a_server_report_and_its_log_line_make_one_priced_record(collected) -> None:
    collector, rows, charges = collected
    collector.server_report(report("r1"))
    assert rows == []  # waits for the front door's view
    collector.edge_line(edge("r1"))
    (row,) = rows
    assert (row.tenant, row.capability, row.method, row.request_type) == ("acme", "text", "Generate", "unary")
    assert (row.input_units, row.output_units, row.status, row.origin) == (40, 8, "OK", "server")
    assert row.duration_ms == 130 and row.ttft_ms == 30 and not row.fell_back
    assert row.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert row.cost_usd == pytest.approx(40 * 0.00000002 + 8 * 0.00000004)
    assert charges == [(row, 48)]


def test_a_call_refused_at_the_edge_is_recorded_without_waiting(collected) -> None:
    collector, rows, _ = collected
    collector.edge_line(edge("r2", upstream=None, grpc_status="ResourceExhausted",
                             reason="RATE_LIMITED", duration_ms=0))
    (row,) = rows
    assert (row.status, row.reason, row.origin, row.input_units, row.cost_usd) == (
        "RESOURCE_EXHAUSTED", "RATE_LIMITED", "edge", 0, 0)


def test_a_retried_call_is_billed_for_the_attempt_that_answered(collected) -> None:
    collector, rows, _ = collected
    collector.server_report(report("r3", status="UNAVAILABLE", units=(40, 0)))
    collector.server_report(report("r3", pool="cloud"))
    collector.edge_line(edge("r3", attempts=2))
    (row,) = rows
    assert row.pool == "cloud" and row.fell_back and row.status == "OK"
    assert row.input_units == 40  # the failed try's work is the mesh's, not the tenant's


def test_a_hedged_call_waits_for_every_attempt_and_a_late_report_is_not_a_second_call(collected) -> None:
    collector, rows, _ = collected
    collector.server_report(report("r7", status="CANCELLED", units=(40, 3)))  # the hedge's loser
    collector.edge_line(edge("r7", attempts=3))
    assert rows == []  # two attempts reported so far: the answer's report is still to come
    collector.server_report(report("r7", pool="cloud"))
    assert rows == []
    collector.server_report(report("r7", status="CANCELLED", units=(40, 1)))
    (row,) = rows
    assert (row.status, row.pool, row.input_units, row.output_units) == ("OK", "cloud", 40, 8)
    collector.server_report(report("r7", status="CANCELLED", units=(40, 2)))  # later still
    time.sleep(0.3)  # past the join window given to this collector (0.2 s)
    collector.expire()
    assert len(rows) == 1


def test_late_or_lone_halves_are_recorded_after_the_join_window(collected) -> None:
    collector, rows, _ = collected
    collector.edge_line(edge("r4"))  # reached a server that never reported (killed)
    collector.server_report(report("r5"))  # its log line never came
    time.sleep(0.3)  # past the join window given to this collector (0.2 s)
    collector.expire()
    assert sorted((r.request_id, r.origin) for r in rows) == [("r4", "edge"), ("r5", "server")]


def test_a_transcoded_call_takes_its_status_from_http(collected) -> None:
    collector, rows, _ = collected
    collector.edge_line(edge("r6", upstream=None, path="/v1/models/smollm2-135m:generate",
                             grpc_status="Unavailable", http_status=401, reason="UNAUTHENTICATED"))
    assert rows[0].status == "UNAUTHENTICATED"


def test_units_counted_and_prices() -> None:
    assert counted_units("tokens", 10, 5) == 15
    assert counted_units("characters", 100, 6.5) == 100  # text read, not audio produced
    assert counted_units("image_steps", 0, 20) == 20
    assert cost_usd({"tokens": 0.5}, "tokens", 2, 0) == 1.0
    assert cost_usd({"input_tokens": 1, "output_tokens": 2}, "tokens", 3, 4) == 11


def test_quota_blocks_units_and_budget_until_the_window_ends() -> None:
    published: list[dict] = []
    rule = LimitRule("text", "", "units", 100, 60)
    snapshot = Snapshot({"acme": TenantPolicy("acme", limits=(rule, LimitRule("*", "", "requests", 10, 60))),
                         "poor": TenantPolicy("poor", monthly_budget_usd=0.01)})
    quota = QuotaController(load=lambda: snapshot, counters=MemoryCounters(), publish=published.append,
                            front_doors=2)
    assert quota.refresh()
    state = published[-1]
    assert state["tenants"]["acme"]["requests"] == {"*": {"*": [5, 60]}}  # half per front door
    assert state["tenants"]["acme"]["blocked"] == {}
    now = datetime.now(UTC)
    quota.charge(UsageRow(time=now, tenant="acme", capability="text", served_model="m", unit="tokens",
                          input_units=60, output_units=39), 99)
    assert not quota.refresh()  # 99 < 100: nothing changes, nothing published
    quota.charge(UsageRow(time=now, tenant="acme", capability="text", served_model="m", unit="tokens",
                          input_units=1, output_units=1), 2)
    quota.charge(UsageRow(time=now, tenant="poor", capability="text", cost_usd=0.02), 0)
    assert quota.refresh()
    blocked = published[-1]["tenants"]
    text_block = blocked["acme"]["blocked"]["text"]["*"]
    assert text_block["reason"] == "RATE_LIMITED" and text_block["until"] > time.time()
    assert blocked["poor"]["blocked"]["*"]["*"]["reason"] == "BUDGET_EXHAUSTED"
    assert published[-1]["version"] == published[0]["version"] + 1
