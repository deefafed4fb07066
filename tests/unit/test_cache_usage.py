"""A response-cache hit in the usage records: units counted (limits), cost 0."""

from __future__ import annotations

from tests.unit.test_usage_collector import collected, edge, report  # noqa: F401 (collected: a fixture)


def test_a_cache_hit_is_recorded_with_its_units_at_no_cost(collected) -> None:  # noqa: F811
    collector, rows, charges = collected
    hit = report("r1")
    hit.origin = "cache"
    collector.server_report(hit)
    collector.edge_line(edge("r1"))
    collector.server_report(report("r2"))
    collector.edge_line(edge("r2"))
    cached, served = rows
    assert (cached.origin, cached.cost_usd, cached.input_units, cached.output_units) == ("cache", 0.0, 40, 8)
    assert served.origin == "server" and served.cost_usd > 0
    assert [units for _, units in charges] == [48, 48]  # both count against the tenant's limits
