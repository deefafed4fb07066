"""Server logs as JSON lines: the fields of a line, the per-call line at DEBUG only, the
trace id from a W3C traceparent."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from aimesh_servers.runtime import logs
from aimesh_servers.runtime.accounting import CallAccount

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The process's logging as a server configures it, into a buffer; restored after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield io.StringIO()
    root.handlers[:] = handlers
    root.setLevel(level)


def account() -> CallAccount:
    call = CallAccount(method="/aimesh.embedding.v1.EmbeddingService/Embed", request_id="r-1",
                       tenant="acme", requested_model="emb", trace_id=TRACE)
    call.set_units("tokens", 7, 0)
    call.duration_s = 0.0123
    call.served_model, call.served_version, call.pool = "emb", "1", "primary"
    return call


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_call_line_at_debug_has_the_fields(captured: io.StringIO, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(logs.LEVEL_ENV, "debug")
    logs.configure(stream=captured)
    logs.CallLog().submit(account())
    [line] = [line for line in lines(captured) if line["message"] == "call"]
    assert line["level"] == "DEBUG" and line["logger"] == "aimesh.calls"
    assert line["time"].endswith("+00:00")
    assert {k: line[k] for k in ("model", "version", "pool", "status", "trace_id", "request_id", "tenant")} == {
        "model": "emb", "version": "1", "pool": "primary", "status": "OK", "trace_id": TRACE,
        "request_id": "r-1", "tenant": "acme"}
    assert line["duration_ms"] == pytest.approx(12.3)
    assert line["method"] == "aimesh.embedding.v1.EmbeddingService/Embed"


def test_info_has_no_per_call_line(captured: io.StringIO, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    logs.configure(stream=captured)
    logs.CallLog().submit(account())
    logging.getLogger("aimesh.test").info("started")
    assert [line["message"] for line in lines(captured)] == ["started"]


def test_an_exception_line_carries_the_traceback(captured: io.StringIO, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    logs.configure(stream=captured)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("aimesh.test").exception("engine failed (incident %s)", "abc")
    [line] = lines(captured)
    assert line["level"] == "ERROR" and line["message"] == "engine failed (incident abc)"
    assert "ValueError: boom" in line["exception"]


@pytest.mark.parametrize(("traceparent", "trace_id"), [
    (f"00-{TRACE}-00f067aa0ba902b7-01", TRACE),
    (f"00-{TRACE.upper()}-00f067aa0ba902b7-00", TRACE),
    ("", ""),
    ("garbage", ""),
    (f"00-{'0' * 32}-00f067aa0ba902b7-01", ""),  # all zeros: invalid per W3C
    ("00-xyz-00f067aa0ba902b7-01", ""),
])
def test_trace_id_of_a_traceparent(traceparent: str, trace_id: str):
    assert logs.trace_id_of(traceparent) == trace_id
