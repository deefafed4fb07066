"""A stand-in Consul agent for tests: Consul itself cannot be installed here.

A real HTTP server implementing exactly the agent endpoints aimesh uses, shaped like
Consul's HTTP API (responses, status codes, X-Consul-* headers):

    PUT /v1/agent/service/register         body keys case-insensitive, snake_case too
    PUT /v1/agent/service/deregister/<id>  404 for an unknown id
    GET /v1/health/service/<name>          ?passing, ?index + ?wait blocking queries

Like a real agent it runs the registered gRPC health checks itself (grpc.health.v1
Check every interval, first run staggered within the interval, new checks start
critical), returns under `passing` only entries whose checks all pass, bumps the
index only when the service's registrations or check statuses change, and reaps a
service critical for longer than DeregisterCriticalServiceAfter (at least 1 minute,
reaper every 30 s). With `acl` it enforces tokens like an agent with `default_policy =
"deny"`: the token comes from X-Consul-Token (or `Authorization: Bearer`, or ?token=),
an unknown one gets 403 "ACL not found", a registration or deregistration without
service:write on the service's name 403 "Permission denied", and a health query without
service:read gets the entries filtered out (X-Consul-Results-Filtered-By-ACLs), as Consul
does. A check with GRPCUseTLS runs over TLS, verifying the server's certificate against
the agent's CA for TLSServerName (else the target's host), and presents the agent's
client certificate: what Consul does with `enable_agent_tls_for_checks` and a cert/key/CA
in its TLS settings (`tls_client`, read once at start like Consul's own, which reloads
them only on `consul reload`); without them, no client certificate and the system's CAs.
Anything else (other check kinds, HTTPS API, KV, catalog, filters, more nodes) is
answered 400/404: a gap must fail loudly, not pass quietly.

    python -m tests.consul_standin --port 8500 [--token SECRET=SERVICE:write ...]
                                   [--tls-ca F --tls-cert F --tls-key F]
                                                    (a process; port 0: a free one)
    with ConsulStandin(acl=...) as agent: agent.address    (a thread, in a test)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import re
import signal
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("consul-standin")

NODE = "consul-standin"
DATACENTER = "dc1"
MAX_WAIT_S = 600.0  # Consul caps `wait` at 10 minutes
DEFAULT_WAIT_S = 300.0
DEFAULT_CHECK_TIMEOUT_S = 10.0
MIN_DEREGISTER_AFTER_S = 60.0
REAP_INTERVAL_S = 30.0
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SERVICE_KEYS = {"name", "id", "tags", "address", "port", "meta", "check", "checks",
                 "enabletagoverride", "weights"}
_CHECK_KEYS = {"grpc", "grpcusetls", "tlsservername", "interval", "timeout", "deregistercriticalserviceafter",
               "name", "checkid", "id", "status", "notes"}


class BadRequest(ValueError):
    pass


class Forbidden(Exception):
    """403, with Consul's words."""


@dataclass(frozen=True)
class Token:
    accessor_id: str
    services: dict[str, str]  # service name -> "read" | "write" (write includes read)

    def may(self, access: str, service: str) -> bool:
        granted = self.services.get(service)
        return granted == "write" or (granted == "read" and access == "read")


ANONYMOUS = Token("00000000-0000-0000-0000-000000000002", {})


@dataclass
class Acl:
    """ACLs on, default policy deny: tokens by secret id; no token is the anonymous one."""

    tokens: dict[str, Token]

    def token(self, secret: str | None) -> Token:
        if not secret:
            return ANONYMOUS
        if secret not in self.tokens:
            raise Forbidden("ACL not found")
        return self.tokens[secret]

    def require(self, token: Token, access: str, service: str) -> None:
        if not token.may(access, service):
            raise Forbidden(f"Permission denied: token with AccessorID '{token.accessor_id}' lacks "
                            f'permission \'service:{access}\' on "{service}"')


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration, as Consul reads every duration ("1s", "1m30s", "250ms")."""
    if not isinstance(text, str) or not text or _DURATION.sub("", text):
        raise BadRequest(f"time: invalid duration {text!r}")
    return sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(text))


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool; a bare `?passing` is true."""
    if text in ("", "1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise BadRequest(f"Invalid value for ?passing: {text!r}")


def _normalized(body: dict[str, Any], allowed: set[str], what: str) -> dict[str, Any]:
    """Consul decodes its JSON keys case-insensitively and accepts snake_case aliases."""
    out = {}
    for key, value in body.items():
        norm = key.replace("_", "").lower()
        if norm not in allowed:
            raise BadRequest(f"Request decode failed: {what} field {key!r} is not supported "
                             "by the stand-in")
        out[norm] = value
    return out


@dataclass(frozen=True)
class TlsClient:
    """The agent's TLS settings its checks use: CA bundle, certificate and key (PEM)."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def from_files(cls, ca: str, cert: str, key: str) -> TlsClient:
        return cls(*(Path(path).read_bytes() for path in (ca, cert, key)))


@dataclass
class Check:
    id: str
    name: str
    service_id: str
    service_name: str
    target: str  # host:port
    grpc_service: str
    interval_s: float
    timeout_s: float
    deregister_after_s: float | None
    notes: str
    use_tls: bool = False
    tls_server_name: str = ""
    tls_client: TlsClient | None = None
    status: str = "critical"
    output: str = ""
    create_index: int = 0
    modify_index: int = 0
    critical_since: float | None = field(default_factory=time.monotonic)
    stop: threading.Event = field(default_factory=threading.Event)

    def probe(self) -> tuple[str, str]:
        """One grpc.health.v1 Check on a fresh connection, as Consul's gRPC check does."""
        where = f"{self.target}/{self.grpc_service}" if self.grpc_service else self.target
        with self._channel() as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=self.grpc_service), timeout=self.timeout_s)
            except grpc.RpcError as exc:
                return "critical", f"gRPC {where} check failed: {exc.code().name}: {exc.details()}"
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return "passing", f"gRPC check {where}: success"
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return "critical", f"gRPC {where} serving status: {name}"

    def _channel(self) -> grpc.Channel:
        if not self.use_tls:
            return grpc.insecure_channel(self.target)
        client = self.tls_client
        credentials = (grpc.ssl_channel_credentials(client.ca, client.key, client.cert) if client
                       else grpc.ssl_channel_credentials())
        options = ([("grpc.ssl_target_name_override", self.tls_server_name)]
                   if self.tls_server_name else [])
        return grpc.secure_channel(self.target, credentials, options)

    def to_json(self, tags: list[str]) -> dict[str, Any]:
        return {
            "Node": NODE, "CheckID": self.id, "Name": self.name, "Status": self.status,
            "Notes": self.notes, "Output": self.output, "ServiceID": self.service_id,
            "ServiceName": self.service_name, "ServiceTags": tags, "Type": "grpc",
            "Interval": f"{self.interval_s:g}s", "Timeout": f"{self.timeout_s:g}s",
            "ExposedPort": 0, "Definition": {}, "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index or self.create_index,
        }


@dataclass
class Service:
    id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    checks: list[Check]
    create_index: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id, "Service": self.name, "Tags": self.tags, "Address": self.address,
            "TaggedAddresses": {}, "Meta": self.meta, "Port": self.port,
            "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}}, "Connect": {},
            "PeerName": "", "CreateIndex": self.create_index, "ModifyIndex": self.create_index,
        }


class Agent:
    """The agent's state: services, checks (each run by its own thread) and the index."""

    def __init__(self, address: str = "127.0.0.1", acl: Acl | None = None,
                 tls_client: TlsClient | None = None) -> None:
        self.address = address
        self.acl = acl
        self.tls_client = tls_client
        self.changed = threading.Condition()
        self.index = 1
        self.service_index: dict[str, int] = {}
        self.services: dict[str, Service] = {}
        self.stopped = threading.Event()
        threading.Thread(target=self._reap, name="consul-standin-reaper", daemon=True).start()

    def _bump(self, service_name: str) -> int:
        """Caller holds self.changed."""
        self.index += 1
        self.service_index[service_name] = self.index
        self.changed.notify_all()
        return self.index

    # -- agent/service endpoints --------------------------------------------------------

    def register(self, body: Any, token: Token | None = None) -> None:
        if not isinstance(body, dict):
            raise BadRequest("Request decode failed: body is not a JSON object")
        spec = _normalized(body, _SERVICE_KEYS, "service")
        name = spec.get("name")
        if not name or not isinstance(name, str):
            raise BadRequest("Missing service name")
        service_id = spec.get("id") or name
        port = spec.get("port", 0)
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise BadRequest(f"Invalid service port: {port!r}")
        if self.acl is not None:
            self.acl.require(token or ANONYMOUS, "write", name)
        tags = list(spec.get("tags") or [])
        raw_checks = ([spec["check"]] if spec.get("check") else []) + list(spec.get("checks") or [])
        checks = [self._check(raw, n, len(raw_checks), service_id, name)
                  for n, raw in enumerate(raw_checks, 1)]
        service = Service(service_id, name, tags, spec.get("address") or "", port,
                          dict(spec.get("meta") or {}), checks)
        with self.changed:
            self._deregister(service_id)  # re-registering an id replaces it and its checks
            service.create_index = self._bump(name)
            for check in checks:
                check.create_index = service.create_index
            self.services[service_id] = service
        for check in checks:
            threading.Thread(target=self._run_check, args=(check,), daemon=True,
                             name=f"check-{check.id}").start()
        log.info("registered %s (%s:%d), %d check(s)", service_id, service.address, port, len(checks))

    def _check(self, raw: Any, number: int, count: int, service_id: str, service_name: str) -> Check:
        if not isinstance(raw, dict):
            raise BadRequest("Request decode failed: a check is not a JSON object")
        spec = _normalized(raw, _CHECK_KEYS, "check")
        if "grpc" not in spec:
            raise BadRequest("the stand-in runs gRPC checks only (no HTTP, TCP, TTL or script)")
        if not isinstance(spec.get("grpcusetls", False), bool):
            raise BadRequest("Request decode failed: GRPCUseTLS is not a boolean")
        if "interval" not in spec:
            raise BadRequest("Check is not valid: Interval must be > 0 for a gRPC check")
        interval = parse_duration(spec["interval"])
        if interval <= 0:
            raise BadRequest("Check is not valid: Interval must be > 0 for a gRPC check")
        status = spec.get("status") or "critical"
        if status not in ("passing", "warning", "critical"):
            raise BadRequest(f"Invalid initial check status {status!r}")
        target, _, grpc_service = str(spec["grpc"]).partition("/")
        deregister = spec.get("deregistercriticalserviceafter")
        check_id = spec.get("checkid") or spec.get("id") or (
            f"service:{service_id}" if count == 1 else f"service:{service_id}:{number}")
        return Check(
            id=check_id, name=spec.get("name") or f"Service '{service_name}' check",
            service_id=service_id, service_name=service_name, target=target,
            grpc_service=grpc_service, interval_s=interval,
            timeout_s=parse_duration(spec["timeout"]) if spec.get("timeout") else DEFAULT_CHECK_TIMEOUT_S,
            deregister_after_s=(max(MIN_DEREGISTER_AFTER_S, parse_duration(deregister))
                                if deregister else None),
            notes=spec.get("notes") or "", status=status, use_tls=spec.get("grpcusetls", False),
            tls_server_name=spec.get("tlsservername") or "", tls_client=self.tls_client,
            critical_since=time.monotonic() if status == "critical" else None,
        )

    def deregister(self, service_id: str, token: Token | None = None) -> bool:
        with self.changed:
            service = self.services.get(service_id)
            if self.acl is not None and service is not None:
                self.acl.require(token or ANONYMOUS, "write", service.name)
            found = self._deregister(service_id)
        if found:
            log.info("deregistered %s", service_id)
        return found

    def _deregister(self, service_id: str) -> bool:
        """Caller holds self.changed."""
        service = self.services.pop(service_id, None)
        if service is None:
            return False
        for check in service.checks:
            check.stop.set()
        self._bump(service.name)
        return True

    # -- health checks ------------------------------------------------------------------

    def _run_check(self, check: Check) -> None:
        # Consul staggers a new check's first run randomly within its interval.
        if check.stop.wait(random.uniform(0, check.interval_s)):
            return
        while not check.stop.is_set():
            status, output = check.probe()
            with self.changed:
                if check.stop.is_set():
                    return
                check.output = output  # output-only changes do not move the index
                if status != check.status:
                    log.info("check %s: %s -> %s (%s)", check.id, check.status, status, output)
                    check.status = status
                    check.critical_since = time.monotonic() if status == "critical" else None
                    check.modify_index = self._bump(check.service_name)
            if check.stop.wait(check.interval_s):
                return

    def _reap(self) -> None:
        while not self.stopped.wait(REAP_INTERVAL_S):
            now = time.monotonic()
            with self.changed:
                doomed = [s.id for s in self.services.values() for c in s.checks
                          if c.deregister_after_s is not None and c.critical_since is not None
                          and now - c.critical_since > c.deregister_after_s]
                for service_id in doomed:
                    log.info("reaping %s: critical past DeregisterCriticalServiceAfter", service_id)
                    self._deregister(service_id)

    # -- health endpoint ----------------------------------------------------------------

    def health_service(self, name: str, query: dict[str, list[str]]) -> tuple[int, list[dict[str, Any]]]:
        unknown = set(query) - {"passing", "index", "wait", "token"}
        if unknown:
            raise BadRequest(f"the stand-in does not implement ?{min(unknown)}")
        passing = parse_bool(query["passing"][0]) if "passing" in query else False
        try:
            min_index = int(query.get("index", ["0"])[0])
        except ValueError:
            raise BadRequest("Invalid index") from None
        try:
            wait = min(parse_duration(query["wait"][0]), MAX_WAIT_S) if "wait" in query else DEFAULT_WAIT_S
        except BadRequest:
            raise BadRequest("Invalid wait time") from None
        deadline = time.monotonic() + wait + random.uniform(0, wait / 16)
        with self.changed:
            while min_index > 0 and self._index_of(name) <= min_index and not self.stopped.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.changed.wait(remaining)
            return self._index_of(name), self._entries(name, passing)

    def _index_of(self, name: str) -> int:
        return self.service_index.get(name, self.index)

    def _entries(self, name: str, passing: bool) -> list[dict[str, Any]]:
        node = {
            "ID": "00000000-0000-0000-0000-000000000001", "Node": NODE, "Address": self.address,
            "Datacenter": DATACENTER, "TaggedAddresses": {"lan": self.address, "wan": self.address},
            "Meta": {"consul-network-segment": ""}, "CreateIndex": 1, "ModifyIndex": 1,
        }
        serf = {
            "Node": NODE, "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing",
            "Notes": "", "Output": "Agent alive and reachable", "ServiceID": "", "ServiceName": "",
            "ServiceTags": [], "Type": "", "Interval": "", "Timeout": "", "ExposedPort": 0,
            "Definition": {}, "CreateIndex": 1, "ModifyIndex": 1,
        }
        entries = []
        for service in sorted(self.services.values(), key=lambda s: s.id):
            if service.name != name:
                continue
            if passing and any(c.status != "passing" for c in service.checks):
                continue
            entries.append({"Node": node, "Service": service.to_json(),
                            "Checks": [serf, *(c.to_json(service.tags) for c in service.checks)]})
        return entries

    def stop(self) -> None:
        self.stopped.set()
        with self.changed:
            for service in self.services.values():
                for check in service.checks:
                    check.stop.set()
            self.changed.notify_all()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Consul's Go server does
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    def _reply(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        if body is None:
            payload, kind = b"", "text/plain; charset=utf-8"
        elif isinstance(body, str):
            payload, kind = body.encode(), "text/plain; charset=utf-8"
        else:
            payload, kind = json.dumps(body).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def _route(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        path = urllib.parse.unquote(url.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        agent = self.server.agent
        headers: dict[str, str] = {}
        try:
            token = self._token(query)
            if path == "/v1/agent/service/register":
                self._only(method, "PUT")
                try:
                    body = json.loads(raw or b"null")
                except ValueError as exc:
                    raise BadRequest(f"Request decode failed: {exc}") from None
                agent.register(body, token)
                self._reply(HTTPStatus.OK)
            elif path.startswith("/v1/agent/service/deregister/"):
                self._only(method, "PUT")
                service_id = path.removeprefix("/v1/agent/service/deregister/")
                if agent.deregister(service_id, token):
                    self._reply(HTTPStatus.OK)
                else:
                    self._reply(HTTPStatus.NOT_FOUND, f'Unknown service ID "{service_id}". Ensure '
                                "that the service ID is passed, not the service name.")
            elif path.startswith("/v1/health/service/"):
                self._only(method, "GET")
                name = path.removeprefix("/v1/health/service/")
                index, entries = agent.health_service(name, query)
                if agent.acl is not None and not token.may("read", name) and entries:
                    entries = []
                    headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
                self._reply(HTTPStatus.OK, entries, {**headers, "X-Consul-Index": str(index),
                                                     "X-Consul-KnownLeader": "true",
                                                     "X-Consul-LastContact": "0"})
            else:
                self._reply(HTTPStatus.NOT_FOUND)
        except _MethodNotAllowed:
            self._reply(HTTPStatus.METHOD_NOT_ALLOWED, f"method {method} not allowed")
        except BadRequest as exc:
            self._reply(HTTPStatus.BAD_REQUEST, str(exc))
        except Forbidden as exc:
            self._reply(HTTPStatus.FORBIDDEN, str(exc))

    def _token(self, query: dict[str, list[str]]) -> Token:
        """The request's ACL token (anonymous without ACLs: then nothing is checked)."""
        agent = self.server.agent
        if agent.acl is None:
            return ANONYMOUS
        bearer = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return agent.acl.token(self.headers.get("X-Consul-Token") or bearer or query.get("token", [""])[0])

    @staticmethod
    def _only(method: str, allowed: str) -> None:
        if method != allowed:
            raise _MethodNotAllowed

    def do_GET(self) -> None:
        self._route("GET")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")


class _MethodNotAllowed(Exception):
    pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], agent: Agent) -> None:
        self.agent = agent
        self.connections: set[socket.socket] = set()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address)

    def drop_connections(self) -> None:
        """A stopped agent is gone: kept-alive connections must not keep answering."""
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class ConsulStandin:
    """The stand-in agent on 127.0.0.1:<port> (0: a free one), served from a thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, acl: Acl | None = None,
                 tls_client: TlsClient | None = None) -> None:
        self.agent = Agent(host, acl, tls_client)
        self.server = _Server((host, port), self.agent)
        self.host, self.port = self.server.server_address[:2]
        self._thread = threading.Thread(target=self.server.serve_forever, name="consul-standin",
                                        daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.agent.stop()
        self.server.shutdown()
        self.server.server_close()
        self.server.drop_connections()
        self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="A stand-in Consul agent for aimesh tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500, help="0 picks a free port (printed)")
    parser.add_argument("--token", action="append", default=[], metavar="SECRET=SERVICE:POLICY",
                        help="turn ACLs on (default deny) with this token (repeatable)")
    parser.add_argument("--tls-ca", help="CA bundle the TLS checks verify servers against")
    parser.add_argument("--tls-cert", help="client certificate the TLS checks present")
    parser.add_argument("--tls-key", help="its private key")
    args = parser.parse_args()
    tls_files = (args.tls_ca, args.tls_cert, args.tls_key)
    if any(tls_files) and not all(tls_files):
        parser.error("--tls-ca, --tls-cert and --tls-key go together")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tokens: dict[str, Token] = {}
    for number, spec in enumerate(args.token, 1):
        secret, _, rule = spec.partition("=")
        service, _, policy = rule.partition(":")
        tokens[secret] = Token(f"00000000-0000-0000-0000-{number:012d}", {service: policy})
    standin = ConsulStandin(args.host, args.port, Acl(tokens) if tokens else None,
                            TlsClient.from_files(*tls_files) if all(tls_files) else None).start()
    print(f"consul stand-in listening on {standin.address}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    standin.stop()


if __name__ == "__main__":
    main()
