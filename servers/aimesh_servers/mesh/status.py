"""`aimesh status`: what a running mesh does now; and the readiness probe behind /readyz.

    aimesh status [--front 127.0.0.1:8080] [--admin-port 9901] [--state-dir .aimesh] [--json] [--watch]

For each model (from the registry API at the front door, which needs no token): its
pools in fallback order, and each endpoint with
- `state`: `up` (its gRPC health check answers SERVING), `not_serving` (loading or
  draining), `down` (no answer within 0.5 s, or the process `aimesh up` started for it is
  gone; such a server also disappears from discovery, so `<state-dir>/servers.json`
  keeps it on the list);
- `envoy`: Envoy's own view from its admin API (/clusters?format=json): `healthy`,
  `failed_health_check`, `ejected` (outlier detection), `pending_health_check`, or
  `absent` (not an endpoint of Envoy's cluster);
and, over the last minute, from Envoy's access log (`<state-dir>/access.log`, one line
per call): calls/s, error rate (any final status but OK), p95 latency, and fallback rate
(calls served by a pool other than the first of the chain).

/readyz: `ReadinessServer` answers 200 when every model has at least one endpoint Envoy
routes to, else 503 with a JSON body naming the models without one. Envoy forwards
/readyz to it (envoy_config.probe_routes); /healthz is Envoy's own direct response.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import Engine

from ..registry.discovery import _alive
from ..registry.schema import Registry
from ..tenancy.collector import edge_status
from ..tenancy.db import usage_records
from .access import MeshAccess

WINDOW_S = 60.0
PROBE_TIMEOUT_S = 0.5
# The newest part of the access log read per refresh: a minute of calls at a few hundred
# calls/s (a line is ~700 bytes).
ACCESS_LOG_TAIL_BYTES = 16 * 1024 * 1024


# --- Envoy's view -------------------------------------------------------------------------

@dataclass
class EnvoyHost:
    address: str
    pool: str  # the locality zone the mesh controller gives each pool's endpoints
    priority: int
    state: str  # healthy, or the flags that keep Envoy from routing to it

    @property
    def healthy(self) -> bool:
        return self.state == "healthy"


def host_state(health: dict[str, Any]) -> str:
    flags = []
    if health.get("failed_active_health_check"):
        flags.append("failed_health_check")
    if health.get("failed_outlier_check"):
        flags.append("ejected")
    if health.get("pending_active_hc"):
        flags.append("pending_health_check")
    if health.get("eds_health_status") not in (None, "HEALTHY"):
        flags.append(f"eds_{str(health['eds_health_status']).lower()}")
    return ",".join(flags) or "healthy"


def envoy_hosts(admin_url: str, timeout_s: float = 2.0) -> dict[str, list[EnvoyHost]] | None:
    """Every cluster's hosts as Envoy sees them; None when its admin API does not answer."""
    try:
        data = httpx.get(f"{admin_url}/clusters", params={"format": "json"}, timeout=timeout_s).json()
    except (httpx.HTTPError, ValueError):
        return None
    clusters: dict[str, list[EnvoyHost]] = {}
    for cluster in data.get("cluster_statuses", []):
        hosts = clusters.setdefault(cluster["name"], [])
        for host in cluster.get("host_statuses", []):
            socket = host["address"]["socket_address"]
            hosts.append(EnvoyHost(
                address=f"{socket['address']}:{socket['port_value']}",
                pool=host.get("locality", {}).get("zone", ""), priority=int(host.get("priority", 0)),
                state=host_state(host.get("health_status", {}))))
    return clusters


# --- /readyz ------------------------------------------------------------------------------

def readiness(registry: Registry, admin_url: str) -> tuple[bool, dict[str, Any]]:
    """(ready, body): ready when every model has at least one endpoint Envoy routes to."""
    clusters = envoy_hosts(admin_url)
    if clusters is None:
        return False, {"ready": False, "error": "Envoy's admin API does not answer",
                       "models_without_healthy_endpoint": [m.id for m in registry.models]}
    healthy = {m.id: sum(h.healthy for h in clusters.get(m.cluster, [])) for m in registry.models}
    missing = [model for model, count in healthy.items() if count == 0]
    return not missing, {"ready": not missing, "healthy_endpoints": healthy,
                         "models_without_healthy_endpoint": missing}


class _ReadinessHandler(BaseHTTPRequestHandler):
    def __init__(self, probe: ReadinessServer, *args: Any) -> None:
        self.probe = probe
        super().__init__(*args)

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/readyz":
            self._answer(404, {"error": f"no such probe {self.path!r}; try /readyz"})
            return
        ready, body = readiness(self.probe.registry, self.probe.admin_url)
        self._answer(200 if ready else 503, body)

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        payload = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # load balancers poll: no log line each
        pass


class ReadinessServer:
    """/readyz over HTTP/1.1 on a loopback port of its own, in a thread (Envoy forwards to it)."""

    def __init__(self, registry: Registry, admin_url: str) -> None:
        self.registry = registry
        self.admin_url = admin_url
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), partial(_ReadinessHandler, self))
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="aimesh-readyz", daemon=True).start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


# --- aimesh status ------------------------------------------------------------------------

@dataclass
class EndpointStatus:
    address: str  # host:port; "pid N" for a server that died before it registered
    state: str  # up | not_serving | down | starting
    envoy: str  # Envoy's view (see the module docstring)


@dataclass
class PoolStatus:
    id: str
    priority: int
    endpoints: list[EndpointStatus] = field(default_factory=list)
    # The registry's live figures of the calls this pool served (its window, e.g. 5
    # minutes: calls, latency_p50/p95, error_rate, fallback_rate, cost_usd), as its JSON.
    live: dict[str, Any] | None = None


@dataclass
class ModelStatus:
    id: str
    pools: list[PoolStatus]
    calls: int = 0  # in the last minute
    calls_per_s: float = 0.0
    error_rate: float = 0.0
    p95_ms: float | None = None
    fallback_rate: float = 0.0


def _probe(address: str, access: MeshAccess) -> str:
    """The endpoint's own gRPC health answer: up, not_serving, or down."""
    with access.server_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError:
            return "down"
    return "up" if reply.status == health_pb2.HealthCheckResponse.SERVING else "not_serving"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def recent_calls(access_log: Path, now: float) -> list[dict[str, Any]]:
    """The access log's lines of calls that started in the last WINDOW_S seconds."""
    try:
        with open(access_log, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - ACCESS_LOG_TAIL_BYTES))
            lines = log.read().splitlines()
    except OSError:
        return []
    calls = []
    for line in lines:
        try:
            call = json.loads(line)
            started = float(call["start_ms"]) / 1000
        except (ValueError, KeyError, TypeError):
            continue  # the first, cut line of the tail, or a line Envoy is still writing
        if now - started <= WINDOW_S:
            calls.append(call)
    return calls


def served_pool(call: dict[str, Any]) -> str:
    """The pool that answered (its response header), "" when none did."""
    pool = call.get("pool")
    return "" if pool in (None, "", "-") else str(pool)


def percentile(ordered: list[float], quantile: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty list."""
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]


def add_call_stats(model: ModelStatus, calls: list[dict[str, Any]]) -> None:
    if not calls:
        return
    first_pool = model.pools[0].id if model.pools else ""
    durations = sorted(float(c.get("duration_ms") or 0) for c in calls)
    served = [pool for pool in map(served_pool, calls) if pool]
    model.calls = len(calls)
    model.calls_per_s = round(len(calls) / WINDOW_S, 3)
    model.error_rate = round(sum(edge_status(c) != "OK" for c in calls) / len(calls), 4)
    model.p95_ms = percentile(durations, 0.95)
    model.fallback_rate = round(sum(p != first_pool for p in served) / len(served), 4) if served else 0.0


# --- live figures for the registry API -----------------------------------------------------

@dataclass
class CallFigures:
    """What a set of calls did over a window (a model's, or one pool's)."""

    calls: int = 0
    calls_per_s: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    error_rate: float = 0.0
    fallback_rate: float = 0.0
    cost_usd: float = 0.0


@dataclass
class ModelFigures:
    total: CallFigures
    pools: dict[str, CallFigures]


class _Series:
    """The calls of one model or pool in the window, kept for exact figures at any moment:
    counters and a sorted list of durations updated as calls come and leave."""

    def __init__(self) -> None:
        self.calls: deque[tuple[float, float, bool, bool, bool]] = deque()  # start, ms, error, served, fell back
        self.durations: list[float] = []  # sorted
        self.errors = self.served = self.fell_back = 0

    def add(self, call: tuple[float, float, bool, bool, bool]) -> None:
        self.calls.append(call)
        bisect.insort(self.durations, call[1])
        self._count(call, 1)

    def drop_before(self, oldest: float) -> None:
        # Lines come in order of their call's end, so one that started earlier may sit
        # behind a newer one: it leaves when the calls before it have left.
        while self.calls and self.calls[0][0] < oldest:
            call = self.calls.popleft()
            del self.durations[bisect.bisect_left(self.durations, call[1])]
            self._count(call, -1)

    def _count(self, call: tuple[float, float, bool, bool, bool], sign: int) -> None:
        _, _, error, served, fell_back = call
        self.errors += sign * error
        self.served += sign * served
        self.fell_back += sign * fell_back

    def figures(self, window_s: float) -> CallFigures:
        calls = len(self.calls)
        if not calls:
            return CallFigures()
        return CallFigures(
            calls=calls, calls_per_s=round(calls / window_s, 4),
            p50_ms=percentile(self.durations, 0.5), p95_ms=percentile(self.durations, 0.95),
            error_rate=round(self.errors / calls, 4),
            fallback_rate=round(self.fell_back / self.served, 4) if self.served else 0.0)


# (model id, pool id) -> US dollars spent over the last `window_s` seconds.
CostSource = Callable[[float], dict[tuple[str, str], float]]


def recorded_costs(engine: Engine) -> CostSource:
    """Cost by (model, pool) from the usage records (the collector prices each call)."""
    def costs(window_s: float) -> dict[tuple[str, str], float]:
        since = datetime.now(UTC) - timedelta(seconds=window_s)
        query = (sa.select(usage_records.c.served_model, usage_records.c.pool,
                           sa.func.sum(usage_records.c.cost_usd))
                 .where(usage_records.c.time >= since)
                 .group_by(usage_records.c.served_model, usage_records.c.pool))
        with engine.connect() as db:
            return {(model, pool): float(cost or 0) for model, pool, cost in db.execute(query)}
    return costs


class LiveFigures:
    """Per model and pool figures over the last `window_s` seconds of Envoy's access log,
    for the registry API. Reads only what Envoy appended since the last look, keeps each
    model's and pool's calls in the window with running counts and sorted durations (a
    look costs nothing per call), and answers from a cache for `cache_s`. Thread-safe.
    A call fell back when a pool other than the chain's first served it, or a retry did."""

    def __init__(self, registry: Registry, access_log: Path, window_s: float = 300.0,
                 cost: CostSource | None = None, cache_s: float = 1.0) -> None:
        self.registry = registry
        self.access_log = access_log
        self.window_s = window_s
        self.cost = cost
        self.cache_s = cache_s
        self._first_pool = {m.cluster: m.pools[0].id if m.pools else "" for m in registry.models}
        self._series: dict[tuple[str, str], _Series] = {}  # (cluster, pool or "" for all)
        self._offset = 0
        self._inode: int | None = None
        self._partial = b""
        self._lock = threading.Lock()
        self._cached: dict[str, ModelFigures] = {}
        self._cached_at = -math.inf

    def snapshot(self) -> dict[str, ModelFigures]:
        with self._lock:
            if time.monotonic() - self._cached_at >= self.cache_s:
                self._cached = self._compute(time.time())
                self._cached_at = time.monotonic()
            return self._cached

    def _read_new_lines(self, oldest: float) -> None:
        try:
            with open(self.access_log, "rb") as log:
                stat = os.fstat(log.fileno())
                if stat.st_ino != self._inode or stat.st_size < self._offset:  # new or truncated
                    self._inode, self._partial = stat.st_ino, b""
                    self._offset = max(0, stat.st_size - ACCESS_LOG_TAIL_BYTES)
                log.seek(self._offset)
                chunk = log.read()
        except OSError:
            return
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            try:
                call = json.loads(line)
                started = float(call["start_ms"]) / 1000
            except (ValueError, KeyError, TypeError):
                continue  # the cut first line of a tail
            cluster = call.get("cluster") or ""
            if started < oldest or cluster not in self._first_pool:
                continue
            pool = served_pool(call)
            fell_back = bool(pool) and (pool != self._first_pool[cluster] or int(call.get("attempts") or 1) > 1)
            record = (started, float(call.get("duration_ms") or 0), edge_status(call) != "OK", bool(pool), fell_back)
            self._series.setdefault((cluster, ""), _Series()).add(record)
            if pool:
                self._series.setdefault((cluster, pool), _Series()).add(record)

    def _figures(self, cluster: str, pool: str) -> CallFigures:
        series = self._series.get((cluster, pool))
        return series.figures(self.window_s) if series else CallFigures()

    def _compute(self, now: float) -> dict[str, ModelFigures]:
        oldest = now - self.window_s
        self._read_new_lines(oldest)
        for series in self._series.values():
            series.drop_before(oldest)
        costs = self.cost(self.window_s) if self.cost else {}
        out = {}
        for model in self.registry.models:
            pools = {}
            for pool in model.pools:
                pools[pool.id] = self._figures(model.cluster, pool.id)
                pools[pool.id].cost_usd = round(costs.get((model.id, pool.id), 0.0), 9)
            total = self._figures(model.cluster, "")
            total.cost_usd = round(sum(v for (m, _), v in costs.items() if m == model.id), 9)
            out[model.id] = ModelFigures(total, pools)
        return out


def collect(front: str, admin_url: str, state_dir: Path) -> list[ModelStatus]:
    """One look at the mesh. Raises RuntimeError when the front door does not answer."""
    access = MeshAccess.read(state_dir)
    try:
        models = httpx.get(access.front_url(front, "/v1/models"), timeout=5,
                           verify=access.http_verify()).json()["models"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise RuntimeError(f"the front door {front} does not answer GET /v1/models: {exc}") from exc
    clusters = envoy_hosts(admin_url) or {}
    # Servers `aimesh up` started, by model and pool: a killed one leaves discovery at once,
    # but stays on this list, so it shows as down instead of vanishing.
    started = _read_json(state_dir / "servers.json") or []
    registered_pids = {f"{r.get('address')}:{r.get('port')}": r.get("pid")
                       for r in map(_read_json, (state_dir / "registrations").glob("*.json")) if r}
    now = time.time()
    by_cluster: dict[str, list[dict[str, Any]]] = {}
    for call in recent_calls(state_dir / "access.log", now):
        by_cluster.setdefault(call.get("cluster") or "", []).append(call)

    out: list[ModelStatus] = []
    probed: list[EndpointStatus] = []
    for model in models:
        hosts = clusters.get(f"model_{model['id']}", [])
        pools = []
        for pool in sorted(model.get("pools", []), key=lambda p: p.get("priority", 0)):
            status = PoolStatus(pool["id"], int(pool.get("priority", 0)), live=pool.get("live"))
            in_envoy = {h.address: h.state for h in hosts if h.pool == pool["id"]}
            addresses = list(dict.fromkeys([*pool.get("endpoints", []), *in_envoy]))
            for address in addresses:
                row = EndpointStatus(address, "down", in_envoy.get(address, "absent"))
                status.endpoints.append(row)
                probed.append(row)
            known_pids = {registered_pids.get(a) for a in addresses}
            for server in started:
                if (server.get("model"), server.get("pool")) != (model["id"], pool["id"]) \
                        or server.get("pid") in known_pids:
                    continue
                state = "starting" if _alive(int(server["pid"])) else "down"
                status.endpoints.append(EndpointStatus(f"pid {server['pid']}", state, "absent"))
            pools.append(status)
        stats = ModelStatus(model["id"], pools)
        add_call_stats(stats, by_cluster.get(f"model_{model['id']}", []))
        out.append(stats)
    if probed:
        with ThreadPoolExecutor(min(16, len(probed))) as probes:
            for row, state in zip(probed, probes.map(partial(_probe, access=access),
                                                     [r.address for r in probed])):
                row.state = state
    return out


def render(models: list[ModelStatus]) -> str:
    lines = [f"{'MODEL / POOL / ENDPOINT':<44} {'CALLS/S':>8} {'ERRORS':>7} {'P95':>9} {'FALLBACK':>9}"]
    for model in models:
        p95 = "-" if model.p95_ms is None else f"{model.p95_ms:.0f} ms"
        lines.append(f"{model.id:<44} {model.calls_per_s:>8.2f} {model.error_rate:>7.1%} {p95:>9} "
                     f"{model.fallback_rate:>9.1%}")
        for pool in model.pools:
            lines.append(f"  pool {pool.id} (fallback {pool.priority})")
            lines.extend(f"    {e.address:<24} {e.state:<12} envoy: {e.envoy}" for e in pool.endpoints)
            if not pool.endpoints:
                lines.append("    (no endpoint)")
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    try:
        return _status_loop(args)
    except KeyboardInterrupt:  # Ctrl-C ends --watch
        return 0


def _status_loop(args: argparse.Namespace) -> int:
    admin_url = f"http://127.0.0.1:{args.admin_port}"
    state_dir = Path(args.state_dir)
    while True:
        try:
            models = collect(args.front, admin_url, state_dir)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            if not args.watch:
                return 2
            models = None
        if models is not None:
            if args.json:
                print(json.dumps({"time": time.time(), "models": [asdict(m) for m in models]}), flush=True)
            else:
                print(("\x1b[H\x1b[2J" if args.watch else "") + render(models), flush=True)
        if not args.watch:
            return 0
        time.sleep(1.0)
