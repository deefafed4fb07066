"""Consul discovery end to end against the stand-in agent (tests/consul_standin.py):
a real `aimesh serve text` process registers itself, the agent health-checks it over
gRPC, ConsulDiscovery's blocking queries see it come and go. Servers that serve mutual
TLS are checked over TLS with the agent's client certificate."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest
from aimesh_servers.mesh.certs import CONSUL_AGENT, CONTROL, MODEL_SERVER, CertSettings, CertStore
from aimesh_servers.registry.consul import (
    SIGNATURE_META,
    ConsulDiscovery,
    ConsulRegistrar,
    RegistrationError,
    parse_http_addr,
    signature,
)
from aimesh_servers.registry.discovery import SERVICE_NAME, Instance
from aimesh_servers.runtime.tls import TlsFiles
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import consul
from tests.consul_standin import Acl, ConsulStandin, TlsClient, Token
from tests.servers import ServerProcess

TEXT_SERVICE = "aimesh.text.v1.TextGenerationService"


class Watcher:
    """Runs ConsulDiscovery.watch() in a task and timestamps every list it yields."""

    def __init__(self, discovery: ConsulDiscovery) -> None:
        self.seen: list[tuple[float, list[Instance]]] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(discovery))

    async def _run(self, discovery: ConsulDiscovery) -> None:
        async for instances in discovery.watch():
            self.seen.append((time.monotonic(), instances))
            self._changed.set()

    async def until(self, predicate: Callable[[list[Instance]], bool], timeout: float,
                    after: int = 0) -> float:
        """Waits for a list yielded after the first `after` that satisfies `predicate`;
        returns when it came."""
        async with asyncio.timeout(timeout):
            while True:
                for at, instances in self.seen[after:]:
                    if predicate(instances):
                        return at
                self._changed.clear()
                await self._changed.wait()

    @property
    def latest(self) -> list[Instance]:
        return self.seen[-1][1] if self.seen else []

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
def agent() -> Iterator[ConsulStandin]:
    with ConsulStandin() as running:
        yield running


@pytest.fixture
async def watcher(agent: ConsulStandin) -> AsyncIterator[Watcher]:
    running = Watcher(ConsulDiscovery(agent.address, wait_s=5))
    await running.until(lambda instances: instances == [], timeout=10)
    yield running
    await running.stop()


@pytest.fixture
def text_server(agent: ConsulStandin) -> Iterator[ServerProcess]:
    server = ServerProcess(["serve", "text"], env={"AIMESH_CONSUL_HTTP_ADDR": agent.address,
                                                   "AIMESH_DRAIN_DELAY_S": "1"})
    try:
        yield server
    finally:
        server.stop()


def registrations(agent: ConsulStandin, token: str | None = None) -> list[dict[str, Any]]:
    """Every registration, passing or not (py-consul's own client, no ?passing)."""
    host, port, _ = parse_http_addr(agent.address)
    with consul.Consul(host=host, port=port, token=token) as client:
        return client.health.service(SERVICE_NAME)[1]


async def test_server_registers_passes_once_loaded_and_leaves_on_drain(agent, watcher, text_server):
    port = await asyncio.to_thread(text_server.wait_listening)
    # Registered while loading (right after binding), but critical (NOT_SERVING) until the
    # model is in: not passing.
    async with asyncio.timeout(10):
        while not (found := registrations(agent)):
            await asyncio.sleep(0.05)
    [entry] = found
    assert entry["Service"]["ID"] == f"smollm2-135m-local-127.0.0.1-{port}"
    assert entry["Service"]["Port"] == port and entry["Service"]["Address"] == "127.0.0.1"
    assert "model=smollm2-135m" in entry["Service"]["Tags"]
    [check] = [c for c in entry["Checks"] if c["ServiceID"]]
    assert check["Type"] == "grpc" and check["Interval"] == "1s" and check["Status"] == "critical"
    assert watcher.latest == []

    await asyncio.to_thread(text_server.wait_serving)
    serving = time.monotonic()
    # Passing within the check interval (1 s) plus its first stagger on a quiet machine;
    # the deadline is generous for a loaded one.
    routed = await watcher.until(lambda found: [i.port for i in found] == [port], timeout=60)
    [instance] = watcher.latest
    assert instance == Instance(id=f"smollm2-135m-local-127.0.0.1-{port}", address="127.0.0.1",
                                port=port, model="smollm2-135m", pool="local", version="1",
                                grpc_service=TEXT_SERVICE)

    mark = len(watcher.seen)
    text_server.terminate(signal.SIGTERM)
    sent = time.monotonic()
    gone = await watcher.until(lambda found: found == [], timeout=10, after=mark)
    assert gone - sent < 1.0, "drain deregisters first: no check interval to wait for"
    assert registrations(agent) == []  # deregistered, not merely critical
    assert await asyncio.to_thread(text_server.proc.wait, 30) == 0
    print(f"\nserving -> passing in discovery: {routed - serving:.2f}s; "
          f"SIGTERM -> gone: {gone - sent:.3f}s")


async def test_killed_server_turns_critical_and_leaves_passing_list(agent, watcher, text_server):
    port = await asyncio.to_thread(text_server.wait_listening)
    await asyncio.to_thread(text_server.wait_serving)
    await watcher.until(lambda found: [i.port for i in found] == [port], timeout=10)

    mark = len(watcher.seen)
    text_server.terminate(signal.SIGKILL)
    killed = time.monotonic()
    gone = await watcher.until(lambda found: found == [], timeout=10, after=mark)
    assert gone - killed < 3.0, "one failed check (interval 1 s, timeout 1 s)"
    # The registration stays until DeregisterCriticalServiceAfter; its check says why.
    [entry] = registrations(agent)
    [check] = [c for c in entry["Checks"] if c["ServiceID"]]
    assert check["Status"] == "critical" and "UNAVAILABLE" in check["Output"]
    print(f"\nSIGKILL -> out of the passing list: {gone - killed:.2f}s")


async def test_discovery_keeps_last_list_while_consul_is_down(agent, watcher, caplog):
    caplog.set_level(logging.INFO, logger="aimesh_servers.registry.consul")
    server = grpc.aio.server()
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await checker.set(TEXT_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    instance = Instance("m-p-1", "127.0.0.1", port, "m", "p", "1", TEXT_SERVICE)
    try:
        await asyncio.to_thread(ConsulRegistrar(agent.address).register, instance)
        await watcher.until(lambda found: found == [instance], timeout=10)
        mark = len(watcher.seen)

        await asyncio.to_thread(agent.stop)  # the agent goes away, connections and all
        deadline = time.monotonic() + 30
        while "keeping the last 1 instance(s)" not in caplog.text:
            assert time.monotonic() < deadline, f"the outage was never noticed: {caplog.text[-500:]}"
            await asyncio.sleep(0.05)
        assert len(watcher.seen) == mark, "an outage is not a change: Envoy keeps its endpoints"
        # Deregistering while the agent is down is best effort: a warning, not a crash.
        await asyncio.to_thread(ConsulRegistrar(agent.address, timeout_s=1).deregister, instance)
        assert "could not deregister m-p-1" in caplog.text

        # A fresh agent on the same port (a restarted dev agent: empty, indexes from 1).
        with ConsulStandin(port=agent.port) as restarted:
            await watcher.until(lambda found: found == [], timeout=15, after=mark)
            assert "reachable again" in caplog.text
            await asyncio.to_thread(ConsulRegistrar(restarted.address).register, instance)
            await watcher.until(lambda found: found == [instance], timeout=10, after=mark + 1)
    finally:
        await server.stop(0)


def test_standin_answers_like_consul(agent):
    base = f"http://{agent.address}/v1"
    with httpx.Client(timeout=10) as http:
        first = http.get(f"{base}/health/service/{SERVICE_NAME}", params={"passing": ""})
        index = int(first.headers["X-Consul-Index"])
        assert first.status_code == 200 and first.json() == [] and index > 0
        # A blocking query on the current index waits `wait` (plus at most wait/16).
        started = time.monotonic()
        same = http.get(f"{base}/health/service/{SERVICE_NAME}", params={"index": index, "wait": "1s"})
        assert time.monotonic() - started >= 1.0 and same.headers["X-Consul-Index"] == str(index)
        assert http.get(f"{base}/health/service/x", params={"passing": "maybe"}).status_code == 400
        assert http.get(f"{base}/health/service/x", params={"index": "1", "wait": "soon"}).status_code == 400
        assert http.get(f"{base}/health/service/x", params={"tag": "a"}).status_code == 400
        assert http.put(f"{base}/agent/service/register", json={"ID": "x"}).text == "Missing service name"
        bad_tls = {"Name": "x", "Check": {"GRPC": "127.0.0.1:1", "Interval": "1s", "GRPCUseTLS": "yes"}}
        assert http.put(f"{base}/agent/service/register", json=bad_tls).status_code == 400
        assert http.get(f"{base}/agent/service/register").status_code == 405
        unknown = http.put(f"{base}/agent/service/deregister/nope")
        assert unknown.status_code == 404 and 'Unknown service ID "nope"' in unknown.text


def test_consul_addresses_parse_like_consul_http_addr():
    assert parse_http_addr("consul:8500") == ("consul", 8500, "http")
    assert parse_http_addr("https://consul.internal") == ("consul.internal", 443, "https")
    assert parse_http_addr("127.0.0.1") == ("127.0.0.1", 8500, "http")
    for bad in ("consul:http", "ftp://consul:8500", ""):
        with pytest.raises(ValueError):
            parse_http_addr(bad)


SERVER_TOKEN, DISCOVERY_TOKEN, MESH_SECRET = "server-token", "discovery-token", "mesh-secret"


@pytest.fixture
async def health_port() -> AsyncIterator[int]:
    """A real gRPC health server answering SERVING for the text service: registrations
    pointing at it pass the agent's checks."""
    server = grpc.aio.server()
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await checker.set(TEXT_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    yield port
    await server.stop(0)


@pytest.fixture
def acl_agent() -> Iterator[ConsulStandin]:
    """ACLs on, default deny: a token that may register model servers, one that may read them."""
    acl = Acl({SERVER_TOKEN: Token("accessor-server", {SERVICE_NAME: "write"}),
               DISCOVERY_TOKEN: Token("accessor-discovery", {SERVICE_NAME: "read"})})
    with ConsulStandin(acl=acl) as running:
        yield running


async def test_tokens_are_enforced_for_registration_and_discovery(acl_agent, health_port, caplog):
    instance = Instance("m-p-1", "127.0.0.1", health_port, "m", "p", "1", TEXT_SERVICE)
    for token, refusal in ((None, "Permission denied"), ("wrong", "ACL not found"),
                           (DISCOVERY_TOKEN, "lacks permission 'service:write'")):
        with pytest.raises(RegistrationError, match=refusal):
            await asyncio.to_thread(ConsulRegistrar(acl_agent.address, token=token).register, instance)
    await asyncio.to_thread(ConsulRegistrar(acl_agent.address, token=SERVER_TOKEN).register, instance)

    reader = Watcher(ConsulDiscovery(acl_agent.address, wait_s=5, token=DISCOVERY_TOKEN))
    anonymous = Watcher(ConsulDiscovery(acl_agent.address, wait_s=5))
    try:
        await reader.until(lambda found: found == [instance], timeout=15)
        await anonymous.until(lambda found: found == [], timeout=15)  # filtered out, as Consul does
        assert instance not in anonymous.latest
        # A read token cannot deregister (a warning); the server's own token can.
        await asyncio.to_thread(ConsulRegistrar(acl_agent.address, token=DISCOVERY_TOKEN).deregister, instance)
        assert "could not deregister m-p-1" in caplog.text and registrations(acl_agent, SERVER_TOKEN)
        await asyncio.to_thread(ConsulRegistrar(acl_agent.address, token=SERVER_TOKEN).deregister, instance)
        await reader.until(lambda found: found == [], timeout=15, after=1)
    finally:
        await reader.stop()
        await anonymous.stop()


def test_tokens_come_from_the_environment_or_a_file(tmp_path, monkeypatch, acl_agent):
    (tmp_path / "token").write_text(SERVER_TOKEN + "\n")
    monkeypatch.setenv("AIMESH_CONSUL_TOKEN_FILE", str(tmp_path / "token"))
    assert ConsulRegistrar(acl_agent.address).client.token == SERVER_TOKEN
    monkeypatch.setenv("AIMESH_CONSUL_TOKEN", DISCOVERY_TOKEN)  # the variable wins over the file
    assert ConsulDiscovery(acl_agent.address).token == DISCOVERY_TOKEN
    with httpx.Client(timeout=10) as http:
        refused = http.put(f"http://{acl_agent.address}/v1/agent/service/register",
                           json={"Name": SERVICE_NAME}, headers={"X-Consul-Token": DISCOVERY_TOKEN})
        assert refused.status_code == 403 and refused.text.startswith("Permission denied")


async def test_discovery_ignores_registrations_not_made_with_the_mesh_secret(agent, health_port, caplog):
    signed = Instance("m-p-1", "127.0.0.1", health_port, "m", "p", "1", TEXT_SERVICE)
    await asyncio.to_thread(ConsulRegistrar(agent.address, secret=MESH_SECRET).register, signed)
    # Foreign registrations, all passing their health checks: unsigned, signed with another
    # secret, and the mesh's signature copied onto a registration for another model.
    base = f"http://{agent.address}/v1/agent/service/register"
    check = {"GRPC": f"127.0.0.1:{health_port}/{TEXT_SERVICE}", "Interval": "1s"}
    forged = Instance("evil-p-1", "127.0.0.1", health_port, "evil", "p", "1", TEXT_SERVICE)
    copied = signature(MESH_SECRET, signed.id, signed.address, signed.port, signed.tags)
    with httpx.Client(timeout=10) as http:
        for service_id, meta in (("unsigned", {}),
                                 ("other-secret", {SIGNATURE_META: signature("other", "other-secret",
                                                                             "127.0.0.1", health_port,
                                                                             forged.tags)}),
                                 (forged.id, {SIGNATURE_META: copied})):
            http.put(base, json={"Name": SERVICE_NAME, "ID": service_id, "Address": "127.0.0.1",
                                 "Port": health_port, "Tags": forged.tags, "Meta": meta,
                                 "Check": check}).raise_for_status()

    everyone = Watcher(ConsulDiscovery(agent.address, wait_s=5))
    mesh_only = Watcher(ConsulDiscovery(agent.address, wait_s=5, secret=MESH_SECRET))
    try:
        await everyone.until(lambda found: len(found) == 4, timeout=15)  # without a secret: all of them
        await mesh_only.until(lambda found: found == [signed], timeout=15)
        # A registration whose check is not passing yet is not even looked at: wait until
        # the mesh's discovery has seen (and refused) both while they pass.
        deadline = time.monotonic() + 30
        while not ("ignoring unsigned: not registered with the mesh's credentials" in caplog.text
                   and f"ignoring {forged.id}" in caplog.text):
            assert time.monotonic() < deadline, caplog.text
            await asyncio.sleep(0.1)
        assert mesh_only.seen[-1][1] == [signed]
    finally:
        await everyone.stop()
        await mesh_only.stop()


async def test_a_server_registers_with_its_token_and_signature_from_the_environment(acl_agent, tmp_path):
    """A real `aimesh serve` process: its token from a file named in its environment (a
    Docker secret), the mesh secret from a variable; registration and deregistration
    through the ACLs, seen by discovery with the mesh's secret only."""
    (tmp_path / "server.token").write_text(SERVER_TOKEN)
    server = ServerProcess(["serve", "embedding"], env={
        "AIMESH_CONSUL_HTTP_ADDR": acl_agent.address, "AIMESH_DRAIN_DELAY_S": "0",
        "AIMESH_CONSUL_TOKEN_FILE": str(tmp_path / "server.token"), "AIMESH_MESH_SECRET": MESH_SECRET})
    mesh = Watcher(ConsulDiscovery(acl_agent.address, wait_s=5, token=DISCOVERY_TOKEN, secret=MESH_SECRET))
    other_mesh = Watcher(ConsulDiscovery(acl_agent.address, wait_s=5, token=DISCOVERY_TOKEN, secret="other"))
    try:
        port = await asyncio.to_thread(server.wait_listening)
        await mesh.until(lambda found: [i.port for i in found] == [port], timeout=120)
        await other_mesh.until(lambda found: found == [], timeout=15)
        assert registrations(acl_agent, SERVER_TOKEN)[0]["Service"]["Meta"][SIGNATURE_META]
        mark = len(mesh.seen)
        server.terminate(signal.SIGTERM)  # deregisters with its own token
        await mesh.until(lambda found: found == [], timeout=60, after=mark)
        assert not registrations(acl_agent, SERVER_TOKEN)
    finally:
        server.stop()
        await mesh.stop()
        await other_mesh.stop()


@pytest.fixture(scope="module")
def mesh_certs(tmp_path_factory) -> CertStore:
    store = CertStore(tmp_path_factory.mktemp("certs"))
    store.init(CertSettings())
    return store


@pytest.fixture
async def tls_health_port(mesh_certs: CertStore) -> AsyncIterator[int]:
    """A gRPC health server serving mutual TLS as a model server does (its certificate,
    a client certificate from the mesh CA required), SERVING for the text service."""
    tls = TlsFiles(mesh_certs.cert_path(MODEL_SERVER), mesh_certs.key_path(MODEL_SERVER),
                   mesh_certs.bundle_path)
    server = grpc.aio.server()
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials())
    await server.start()
    await checker.set(TEXT_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    yield port
    await server.stop(0)


def agent_tls(store: CertStore, identity: str = CONSUL_AGENT) -> TlsClient:
    return TlsClient.from_files(str(store.bundle_path), str(store.cert_path(identity)),
                                str(store.key_path(identity)))


async def checked(agent: ConsulStandin, instance: Instance, tls: bool) -> dict[str, Any]:
    """Registers `instance` and returns its check once the agent has run it at least once."""
    await asyncio.to_thread(ConsulRegistrar(agent.address, tls=tls).register, instance)
    deadline = time.monotonic() + 30
    while True:
        [entry] = registrations(agent)
        [check] = [c for c in entry["Checks"] if c["ServiceID"]]
        if check["Output"]:
            return check
        assert time.monotonic() < deadline, f"the check never ran: {check}"
        await asyncio.sleep(0.05)


async def test_tls_servers_get_tls_checks_that_present_the_agents_certificate(mesh_certs, tls_health_port,
                                                                             tmp_path):
    instance = Instance("m-p-1", "127.0.0.1", tls_health_port, "m", "p", "1", TEXT_SERVICE)
    with ConsulStandin(tls_client=agent_tls(mesh_certs)) as agent:
        check = await checked(agent, instance, tls=True)
        assert check["Status"] == "passing", check["Output"]
        discovery = Watcher(ConsulDiscovery(agent.address, wait_s=5))
        try:
            await discovery.until(lambda found: found == [instance], timeout=15)
        finally:
            await discovery.stop()
        # A plaintext check of a TLS server fails, as it would in Consul.
        plain = await checked(agent, instance, tls=False)
        assert plain["Status"] == "critical", plain["Output"]

    # The server refuses an agent without a client certificate, or with one from another CA.
    other = CertStore(tmp_path / "other")
    other.init(CertSettings())
    foreign = TlsClient(mesh_certs.bundle_path.read_bytes(), other.cert_path(CONSUL_AGENT).read_bytes(),
                        other.key_path(CONSUL_AGENT).read_bytes())
    for client in (None, foreign):
        with ConsulStandin(tls_client=client) as agent:
            check = await checked(agent, instance, tls=True)
            assert check["Status"] == "critical" and "UNAVAILABLE" in check["Output"], check["Output"]


async def test_tls_checks_verify_the_server_name(mesh_certs):
    """TLSServerName is checked: a server presenting the control certificate (no
    `model-server` name) fails the model servers' TLS check."""
    tls = TlsFiles(mesh_certs.cert_path(CONTROL), mesh_certs.key_path(CONTROL), mesh_certs.bundle_path)
    server = grpc.aio.server()
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials())
    await server.start()
    await checker.set(TEXT_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    try:
        with ConsulStandin(tls_client=agent_tls(mesh_certs)) as agent:
            instance = Instance("m-p-1", "127.0.0.1", port, "m", "p", "1", TEXT_SERVICE)
            check = await checked(agent, instance, tls=True)
            assert check["Status"] == "critical", check["Output"]
    finally:
        await server.stop(0)
