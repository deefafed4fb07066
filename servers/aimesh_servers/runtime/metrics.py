"""Prometheus metrics of a model server, fed by the account of every call it ran.

`ServerMetrics` is an accounting sink (`accounting.install_sink`): each closed
`CallAccount` counts one call by method, model, pool and final gRPC code, its errors by
reason, its latency and time to first output, and the units it used (input and output,
by unit: tokens, images, seconds of audio...). The admission state (slots, calls in
flight, calls queued for a slot, the expected wait of the next one, refusals) is read
from the server's `Admission` at scrape time. Served in the Prometheus text format over
HTTP on a port of its own (`AIMESH_METRICS_PORT`), apart from the gRPC port.
"""

from __future__ import annotations

from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .accounting import CallAccount
from .admission import Admission

# From an embedding (~10 ms) to a long text or audio stream (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
CALL_LABELS = ("method", "model", "pool")


class _AdmissionCollector(Collector):
    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        admission = self.admission
        yield GaugeMetricFamily("aimesh_server_slots", "Calls the engines run at once.",
                                value=admission.slots)
        yield GaugeMetricFamily("aimesh_server_in_flight", "Slots held by admitted calls.",
                                value=admission.in_flight)
        yield GaugeMetricFamily("aimesh_server_queue_depth", "Calls waiting for a slot.",
                                value=admission.waiting)
        expected = admission.expected_wait_s(admission.waiting + 1) if admission.waiting else 0.0
        yield GaugeMetricFamily(
            "aimesh_server_queue_expected_wait_seconds",
            "Expected wait for a slot of a call arriving now (0: a slot is free or nobody waits).",
            value=expected or 0.0)
        yield CounterMetricFamily("aimesh_server_busy_refusals",
                                  "Calls refused RESOURCE_EXHAUSTED: no slot in time.",
                                  value=admission.refused)


class ServerMetrics:
    def __init__(self, admission: Admission | None = None, default_pool: str = "",
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.default_pool = default_pool
        self.calls = Counter("aimesh_server_calls", "Calls that ended, by final gRPC code.",
                             (*CALL_LABELS, "code"), registry=self.registry)
        self.errors = Counter("aimesh_server_errors", "Calls that ended with a code other than OK.",
                              (*CALL_LABELS, "code", "reason"), registry=self.registry)
        self.duration = Histogram("aimesh_server_call_duration_seconds",
                                  "From admission to the final status.", CALL_LABELS,
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_output = Histogram("aimesh_server_time_to_first_output_seconds",
                                      "From admission to the first response message.",
                                      CALL_LABELS, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.input_units = Counter("aimesh_server_input_units", "Units calls consumed.",
                                   ("model", "pool", "unit"), registry=self.registry)
        self.output_units = Counter("aimesh_server_output_units", "Units calls produced.",
                                    ("model", "pool", "unit"), registry=self.registry)
        if admission is not None:
            self.registry.register(_AdmissionCollector(admission))
        self._http: WSGIServer | None = None

    def submit(self, account: CallAccount) -> None:
        """Runs on the event loop at the end of every call: a few counter updates, no I/O."""
        method = account.method.lstrip("/")
        model = account.served_model or account.requested_model
        pool = account.pool or self.default_pool
        self.calls.labels(method, model, pool, account.status).inc()
        if account.status != "OK":
            self.errors.labels(method, model, pool, account.status, account.reason).inc()
        self.duration.labels(method, model, pool).observe(account.duration_s)
        if account.first_output_s is not None:
            self.first_output.labels(method, model, pool).observe(account.first_output_s)
        if account.unit:
            self.input_units.labels(model, pool, account.unit).inc(account.input_units)
            self.output_units.labels(model, pool, account.unit).inc(account.output_units)

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics on host:port (0 picks a free port) in a thread; returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
