"""The usage collector: one usage record per call that reached the front door.

Two views of a call meet here, joined by Envoy's request id:
- the model server's (`UsageIngestService.ReportCalls`, batched by each server): units
  produced, cancelled or not, the model, version and pool that served, time to first
  output, the server's status;
- the front door's (Envoy's JSON access log, tailed): the verified tenant, the model
  asked for, the whole call's duration and status, retries, and the calls Envoy answered
  itself (no token, refused by admission, no healthy server) which no server saw.
A call with an upstream waits up to `join_window_s` for the reports of all its attempts
(Envoy's log says how many); a server report that never meets a log line (a call made
straight to a server, not through the front door) is recorded alone, and one that comes
after its call was recorded (an abandoned attempt reporting late) is dropped. A call is
billed for the attempt whose answer the caller got: the work of attempts the mesh
abandoned (a failed try before a fallback, the loser of a hedge) is the mesh's cost. Each finished record gets its cost from the registry's
prices, goes to the recorder (batched to the database) and is charged to the tenant's
limits and budget.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aimesh.usage.v1 import usage_ingest_pb2 as ingest_pb
from aimesh.usage.v1 import usage_ingest_pb2_grpc as ingest_grpc
from aimesh.usage.v1 import usage_pb2
from google.protobuf import descriptor_pool

from ..mesh.tenancy_envoy import ADMIN_CAPABILITY, USAGE_CAPABILITY
from ..mesh.tenancy_envoy import SERVICE_CAPABILITY as MODEL_SERVICE_CAPABILITY
from ..registry.schema import Registry
from .recorder import UsageRow

log = logging.getLogger(__name__)

# gRPC service -> capability short name (as in token scopes, limits and usage), and the
# control plane's own APIs.
SERVICE_CAPABILITY = {
    **MODEL_SERVICE_CAPABILITY,
    "aimesh.registry.v1.ModelRegistryService": "registry",
    "aimesh.usage.v1.UsageService": USAGE_CAPABILITY,
    "aimesh.tenancy.v1.TenantService": ADMIN_CAPABILITY,
}

# Which side of a call its limits count, per unit: prompt and completion tokens both
# count; images count the steps made, speech the audio heard, synthesis the text read.
COUNTED = {
    "tokens": lambda i, o: i + o,
    "image_steps": lambda i, o: o,
    "audio_seconds": lambda i, o: i,
    "characters": lambda i, o: i,
    "images": lambda i, o: i,
}

GRPC_CODE_NAMES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                   "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                   "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                   "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"]
HTTP_TO_GRPC = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                404: "NOT_FOUND", 409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
                500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def counted_units(unit: str, input_units: float, output_units: float) -> float:
    return COUNTED.get(unit, lambda i, o: i + o)(input_units, output_units)


def cost_usd(prices: dict[str, float], unit: str, input_units: float, output_units: float) -> float:
    """Registry prices are USD per unit: `input_<unit>`, `output_<unit>`, or `<unit>` for
    the counted side."""
    return (prices.get(f"input_{unit}", 0.0) * input_units
            + prices.get(f"output_{unit}", 0.0) * output_units
            + prices.get(unit, 0.0) * counted_units(unit, input_units, output_units))


def request_type(service: str, method: str) -> str:
    try:
        rpc = descriptor_pool.Default().FindServiceByName(service).methods_by_name[method]
    except KeyError:
        return ""
    return {(False, False): "unary", (False, True): "server_stream",
            (True, False): "client_stream", (True, True): "bidi_stream"}[
        (rpc.client_streaming, rpc.server_streaming)]


@dataclass
class _Pending:
    reports: list[usage_pb2.UsageRecord] = field(default_factory=list)
    edge: dict[str, Any] | None = None
    since: float = field(default_factory=time.monotonic)


Charge = Callable[[UsageRow, float], None]  # (row, counted units) -> None


RECORDED_IDS_KEPT = 50_000  # past this many, ids older than 10 join windows are forgotten


class UsageCollector:
    """Joins the two views of each call and emits one UsageRow per call."""

    def __init__(self, registry: Registry, submit: Callable[[UsageRow], None], charge: Charge,
                 join_window_s: float = 5.0) -> None:
        self.registry = registry
        self.submit = submit
        self.charge = charge
        self.join_window_s = join_window_s
        self._pending: dict[str, _Pending] = {}
        # Request ids recorded lately (monotonic time), so a late attempt report is not
        # recorded as a second call.
        self._recorded: dict[str, float] = {}
        self._lock = threading.Lock()
        self.records = 0
        # Joining, pricing and charging (which may wait on Redis) run on one thread of
        # their own, never on the event loop that takes the reports and the log lines.
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="usage-collector", daemon=True)
        self._thread.start()

    def feed_report(self, record: usage_pb2.UsageRecord) -> None:
        self._inbox.put(("report", record))

    def feed_edge(self, line: dict[str, Any]) -> None:
        self._inbox.put(("edge", line))

    def close(self, timeout_s: float = 10.0) -> None:
        """Processes everything fed so far, finishes every pending call, stops the thread."""
        self._inbox.put(("stop", None))
        self._thread.join(timeout_s)
        self.flush()

    def _work(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get(timeout=0.5)
            except queue.Empty:
                self.expire()
                continue
            if kind == "stop":
                return
            try:
                (self.server_report if kind == "report" else self.edge_line)(item)
            except Exception:
                log.exception("usage collector: %s not processed", kind)
            if self._inbox.empty():
                self.expire()

    # -- inputs ---------------------------------------------------------------------

    def server_report(self, record: usage_pb2.UsageRecord) -> None:
        if not record.request_id:  # not through the front door: nothing to wait for
            self._finish(_Pending(reports=[record]))
            return
        with self._lock:
            if record.request_id in self._recorded:
                log.debug("late report of an abandoned attempt of %s dropped", record.request_id)
                return
            pending = self._pending.setdefault(record.request_id, _Pending())
            pending.reports.append(record)
            ready = pending.edge is not None and len(pending.reports) >= _attempts(pending.edge)
            if ready:
                del self._pending[record.request_id]
        if ready:
            self._finish(pending)

    def edge_line(self, line: dict[str, Any]) -> None:
        request_id = line.get("request_id") or ""
        reached_server = bool(line.get("upstream")) and line.get("cluster") not in (None, "", "control")
        with self._lock:
            pending = self._pending.pop(request_id, None) if request_id else None
            if pending is None:
                pending = _Pending()
            pending.edge = line
            if reached_server and len(pending.reports) < _attempts(line):
                self._pending[request_id] = pending  # wait for every attempt's report
                return
        self._finish(pending)

    def expire(self) -> None:
        """Finishes calls whose other half did not come within the join window."""
        now = time.monotonic()
        with self._lock:
            late = [k for k, p in self._pending.items() if now - p.since > self.join_window_s]
            expired = [self._pending.pop(k) for k in late]
        for pending in expired:
            self._finish(pending)

    def flush(self) -> None:
        with self._lock:
            rest, self._pending = list(self._pending.values()), {}
        for pending in rest:
            self._finish(pending)

    # -- the joined record ----------------------------------------------------------

    def _finish(self, pending: _Pending) -> None:
        request_id = (pending.edge or {}).get("request_id") or (
            pending.reports[0].request_id if pending.reports else "")
        if request_id:
            now = time.monotonic()
            with self._lock:
                self._recorded[request_id] = now
                if len(self._recorded) > RECORDED_IDS_KEPT:
                    horizon = now - 10 * self.join_window_s
                    self._recorded = {k: t for k, t in self._recorded.items() if t > horizon}
        try:
            row = self._row(pending)
        except Exception:  # a malformed line must not stop the collector
            log.exception("usage record could not be built")
            return
        if row is None:
            return
        self.records += 1
        self.submit(row)
        self.charge(row, counted_units(row.unit, row.input_units, row.output_units))

    def _row(self, pending: _Pending) -> UsageRow | None:
        edge, reports = pending.edge or {}, pending.reports
        final = next((r for r in reversed(reports) if r.status == "OK"), reports[-1] if reports else None)
        service, method = _split_method(edge.get("grpc_path") or edge.get("path") or "") if edge else ("", "")
        if final is not None:
            service, method = final.service or service, final.method or method
        if not service:
            return None  # neither an aimesh call nor a server report: not recorded
        capability = SERVICE_CAPABILITY.get(service, "")
        if capability in ("registry",) and final is None:
            return None  # model listing through the front door is free and not metered
        unit = final.unit if final else ""
        input_units = final.input_units if final else 0.0
        output_units = final.output_units if final else 0.0
        requested = edge.get("model") or (final.requested_model if final else "")
        served_model = final.served_model if final else ""
        model = self.registry.get(served_model or requested) if (served_model or requested) else None
        prices = dict(model.prices) if model else {}
        pool = final.pool if final else ""
        first_pool = model.pools[0].id if model and model.pools else pool
        attempts = _attempts(edge) if edge else 1
        # The server knows how its call ended; Envoy's view of a transcoded call is only an
        # HTTP status, and it alone knows the calls no server saw.
        status = final.status if final is not None else edge_status(edge)
        reason = (edge.get("reason") or "") if edge else ""
        if not reason and final is not None and final.status != "OK":
            reason = final.reason
        if not reason and status == "UNAUTHENTICATED":
            reason = "UNAUTHENTICATED"
        if edge and edge.get("start_ms"):
            start = datetime.fromtimestamp(int(edge["start_ms"]) / 1000, UTC)
        elif final is not None:
            start = final.time.ToDatetime(tzinfo=UTC)
        else:
            start = datetime.now(UTC)
        if edge and edge.get("duration_ms") not in (None, "", "-"):
            duration_ms = float(edge["duration_ms"])
        else:
            duration_ms = final.duration.ToNanoseconds() / 1e6 if final else 0.0
        ttft_ms = (final.time_to_first_output.ToNanoseconds() / 1e6
                   if final is not None and final.HasField("time_to_first_output") else None)
        trace = (edge.get("trace_id") or "") if edge else ""
        from_cache = final is not None and final.origin == "cache"
        return UsageRow(
            request_id=(edge.get("request_id") if edge else "") or (final.request_id if final else ""),
            time=start,
            tenant=(edge.get("tenant") if edge else "") or (final.tenant if final else "") or "",
            capability=capability, service=service, method=method,
            request_type=request_type(service, method),
            requested_model=requested, served_model=served_model,
            served_version=final.served_version if final else "", pool=pool, unit=unit,
            input_units=input_units, output_units=output_units, duration_ms=duration_ms,
            ttft_ms=ttft_ms, status=status, reason=reason,
            fell_back=bool(final is not None and pool and (attempts > 1 or pool != first_pool)),
            # A response-cache hit counts its units (limits) but costs nothing.
            cost_usd=0.0 if from_cache else cost_usd(prices, unit, input_units, output_units),
            trace_id=trace.split("-")[1] if trace.count("-") >= 3 else "",
            origin="cache" if from_cache else "server" if final is not None else "edge",
        )


def _attempts(edge: dict[str, Any]) -> int:
    try:
        return max(1, int(edge.get("attempts") or 1))
    except ValueError:  # "-": Envoy made no upstream attempt
        return 1


def _split_method(path: str) -> tuple[str, str]:
    service, _, method = path.strip("/").partition("/")
    return (service, method) if service.startswith("aimesh.") else ("", "")


REASON_STATUS = {"UNAUTHENTICATED": "UNAUTHENTICATED", "PERMISSION_DENIED": "PERMISSION_DENIED",
                 "RATE_LIMITED": "RESOURCE_EXHAUSTED", "BUDGET_EXHAUSTED": "RESOURCE_EXHAUSTED"}


def edge_status(edge: dict[str, Any]) -> str:
    """How Envoy saw the call end: its own refusal's reason, %GRPC_STATUS% for a gRPC call
    ("ResourceExhausted", or a number), else the HTTP status of a transcoded call."""
    if status := REASON_STATUS.get(edge.get("reason") or ""):
        return status
    transcoded = (edge.get("path") or "") != (edge.get("grpc_path") or edge.get("path") or "")
    grpc_status = str(edge.get("grpc_status") or "")
    if grpc_status and grpc_status != "-" and not transcoded:
        if grpc_status.isdigit():
            code = int(grpc_status)
            return GRPC_CODE_NAMES[code] if code < len(GRPC_CODE_NAMES) else "UNKNOWN"
        return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", grpc_status).upper()
    http = int(edge.get("http_status") or 0)
    if http == 0:
        return "CANCELLED" if "DC" in str(edge.get("flags", "")) else "UNKNOWN"
    return "OK" if http < 400 else HTTP_TO_GRPC.get(http, "UNKNOWN")


class IngestServicer(ingest_grpc.UsageIngestServiceServicer):
    def __init__(self, collector: UsageCollector) -> None:
        self.collector = collector

    async def ReportCalls(self, request: ingest_pb.ReportCallsRequest, context
                          ) -> ingest_pb.ReportCallsResponse:
        for record in request.records:
            self.collector.feed_report(record)
        return ingest_pb.ReportCallsResponse(accepted=len(request.records))


class AccessLogTail:
    """Follows Envoy's JSON access log (which Envoy flushes every few hundred ms) from
    where it stood when the collector started; survives the file being recreated."""

    def __init__(self, path: Path, on_line: Callable[[dict[str, Any]], None]) -> None:
        self.path = path
        self.on_line = on_line

    async def run(self, poll_s: float = 0.1) -> None:
        handle = None
        inode = None
        buffered = b""
        try:
            while True:
                if handle is None and self.path.exists():
                    handle = open(self.path, "rb")  # noqa: SIM115, ASYNC230 - held across polls; local file
                    inode = os.fstat(handle.fileno()).st_ino
                if handle is not None:
                    chunk = handle.read()
                    if chunk:
                        buffered += chunk
                        *lines, buffered = buffered.split(b"\n")
                        for raw in lines:
                            self._line(raw)
                    elif self.path.exists() and os.stat(self.path).st_ino != inode:
                        handle.close()
                        handle, buffered = None, b""
                        continue
                await asyncio.sleep(poll_s)
        finally:
            if handle is not None:
                handle.close()

    def _line(self, raw: bytes) -> None:
        try:
            line = json.loads(raw)
        except ValueError:
            log.warning("access log line is not JSON: %.200r", raw)
            return
        self.on_line(line)
