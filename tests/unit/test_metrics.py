"""The metrics sink over real CallAccounts and a real Admission, read back over HTTP."""

from __future__ import annotations

import asyncio
import contextvars

import grpc
import httpx
import pytest
from aimesh_servers.runtime import accounting
from aimesh_servers.runtime.accounting import CallAccount
from aimesh_servers.runtime.admission import Admission
from aimesh_servers.runtime.errors import ServerBusy
from aimesh_servers.runtime.metrics import ServerMetrics
from aimesh_servers.runtime.service import SERVED_BY_METADATA
from prometheus_client.parser import text_string_to_metric_families

EMBED = "/aimesh.embedding.v1.EmbeddingService/Embed"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, by name and sorted labels."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def run_call(method: str, requested: str, served: str | None, code: grpc.StatusCode,
             reason: str = "", units: tuple[str, float, float] | None = None) -> None:
    """One call's account as the interceptor keeps it: begun, shown output, ended."""

    def call() -> None:
        account = CallAccount(method=method, request_id="r", tenant="t", requested_model=requested)
        if served is not None:
            SERVED_BY_METADATA.set((("x-aimesh-served-model", served),
                                    ("x-aimesh-served-version", "1"), ("x-aimesh-pool", "primary")))
            account.observe(object())  # a first message: sets time to first output
        if units is not None:
            account.set_units(*units)
        account.end(code, reason)

    contextvars.copy_context().run(call)  # each call has its own served-by context


@pytest.fixture
def metrics():
    sink = ServerMetrics(Admission(slots=2, max_queue=4, queue_timeout_s=30), default_pool="local")
    port = sink.serve("127.0.0.1", 0)
    accounting.install_sink(sink)
    try:
        yield sink, port
    finally:
        accounting.install_sink(None)
        sink.close()


def labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


def test_calls_errors_latency_and_units_by_model_and_pool(metrics):
    _, port = metrics
    for _ in range(3):
        run_call(EMBED, "minilm", "minilm", grpc.StatusCode.OK, units=("texts", 2, 768))
    run_call(EMBED, "minilm", "minilm", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    # Refused before the servicer said who serves: the requested model and the server's pool.
    run_call(EMBED, "minilm", None, grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_BUSY")

    seen = scrape(port)
    method = EMBED.lstrip("/")
    assert seen[("aimesh_server_calls_total",
                 labels(method=method, model="minilm", pool="primary", code="OK"))] == 3
    assert seen[("aimesh_server_calls_total", labels(
        method=method, model="minilm", pool="primary", code="INVALID_ARGUMENT"))] == 1
    assert seen[("aimesh_server_errors_total", labels(
        method=method, model="minilm", pool="local", code="RESOURCE_EXHAUSTED",
        reason="SERVER_BUSY"))] == 1
    assert ("aimesh_server_errors_total", labels(
        method=method, model="minilm", pool="primary", code="OK", reason="")) not in seen
    assert seen[("aimesh_server_call_duration_seconds_count",
                 labels(method=method, model="minilm", pool="primary"))] == 4
    assert seen[("aimesh_server_time_to_first_output_seconds_count",
                 labels(method=method, model="minilm", pool="primary"))] == 4
    # The refused call sent nothing: no time to first output.
    assert ("aimesh_server_time_to_first_output_seconds_count",
            labels(method=method, model="minilm", pool="local")) not in seen
    assert seen[("aimesh_server_input_units_total",
                 labels(model="minilm", pool="primary", unit="texts"))] == 6
    assert seen[("aimesh_server_output_units_total",
                 labels(model="minilm", pool="primary", unit="texts"))] == 3 * 768


def test_every_installed_sink_sees_each_call(metrics):
    sink, _ = metrics
    seen: list[CallAccount] = []

    class Collect:
        def submit(self, account: CallAccount) -> None:
            seen.append(account)

    accounting.install_sink(Collect())
    run_call(EMBED, "minilm", "minilm", grpc.StatusCode.OK)
    assert len(seen) == 1
    assert sink.calls.labels(EMBED.lstrip("/"), "minilm", "primary", "OK")._value.get() == 1


async def test_admission_gauges_read_at_scrape_time():
    admission = Admission(slots=1, max_queue=1, queue_timeout_s=30)
    sink = ServerMetrics(admission)
    port = sink.serve("127.0.0.1", 0)
    try:
        held = await admission.acquire(None)
        waiter = asyncio.create_task(admission.acquire(None))
        while admission.waiting == 0:
            await asyncio.sleep(0.005)
        with pytest.raises(ServerBusy):  # the queue is full: refused at once
            await admission.acquire(None)
        seen = await asyncio.to_thread(scrape, port)
        assert seen[("aimesh_server_slots", ())] == 1
        assert seen[("aimesh_server_in_flight", ())] == 1
        assert seen[("aimesh_server_queue_depth", ())] == 1
        assert seen[("aimesh_server_busy_refusals_total", ())] == 1
        admission.release(held)
        admission.release(await asyncio.wait_for(waiter, 10))
        seen = await asyncio.to_thread(scrape, port)
        assert seen[("aimesh_server_in_flight", ())] == 0
        assert seen[("aimesh_server_queue_depth", ())] == 0
        assert seen[("aimesh_server_queue_expected_wait_seconds", ())] == 0
    finally:
        sink.close()
