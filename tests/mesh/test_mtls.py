"""Mutual TLS inside the mesh (`aimesh up --mtls`) and TLS on the front door (`--tls-cert`).

A real mesh: Envoy calls the model server and the control server over mutual TLS; a
plaintext client, a TLS client without a certificate and one whose certificate comes from
another CA are refused by the servers; a rotation (leaves, then a whole CA rollover) under
a caller loop loses no call, and the servers and Envoy present the new certificates
(serials read from TLS handshakes and from Envoy's /certs).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aimesh
import grpc
import pytest
from aimesh.embedding.v1 import embedding_pb2
from aimesh.jobs.v1 import jobs_pb2
from aimesh_servers.mesh.certs import (
    CONTROL,
    ENVOY,
    FRONT_DOOR,
    MODEL_SERVER,
    CertSettings,
    CertStore,
)
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.mesh.conftest import Mesh
from tests.polling import poll

pytestmark = pytest.mark.timeout(900)

MODEL = "minilm"
REGISTRY = f"""
kind: aimesh/registry/v1
models:
  - id: {MODEL}
    capability: embedding
    versions: [{{version: "1", source: "builtin:all-minilm-l6-v2"}}]
    pools:
      - {{id: local, serve: embedding, replicas: 1}}
"""


class TlsMesh:
    def __init__(self, folder: Path) -> None:
        self.front_certs = CertStore(folder / "front")
        self.front_certs.init(CertSettings(front_door_hosts=["localhost"]))
        (folder / "registry.yaml").write_text(REGISTRY)
        self.mesh = Mesh(folder / "state", registry=folder / "registry.yaml", extra_args=[
            "--mtls", "--tls-cert", str(self.front_certs.cert_path(FRONT_DOOR)),
            "--tls-key", str(self.front_certs.key_path(FRONT_DOOR))])
        self.certs = CertStore(folder / "state" / "certs")

    @property
    def front(self) -> str:
        return f"localhost:{self.mesh.port}"

    @property
    def server_port(self) -> int:
        return int(self.mesh.wait_line(r"local#0: serving \S+ on port (\d+)").group(1))

    @property
    def control_port(self) -> int:
        return int(self.mesh.wait_line(r"^\[aimesh-server\] listening on [\d.]+:(\d+), mutual TLS").group(1))

    def client(self) -> aimesh.Client:
        roots = self.front_certs.bundle_path.read_bytes()
        return aimesh.Client(self.front, credentials=grpc.ssl_channel_credentials(roots), timeout=60)

    def envoy_certs(self) -> dict[str, list[int]]:
        """Serials Envoy holds now: its client certificates and the CAs it trusts upstream."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.mesh.admin_port}/certs", timeout=10) as reply:
            found: dict[str, list[int]] = {"client": [], "ca": []}
            for context in json.load(reply)["certificates"]:
                for cert in context.get("cert_chain", []):
                    if {"dns": ENVOY} in cert.get("subject_alt_names", []):
                        found["client"].append(int(cert["serial_number"], 16))
                for cert in context.get("ca_cert", []):
                    if cert["serial_number"] not in {f"{c.serial_number:x}" for c in self.front_certs.bundle()}:
                        found["ca"].append(int(cert["serial_number"], 16))
            return found


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMesh]:
    running = TlsMesh(tmp_path_factory.mktemp("mtls"))
    try:
        running.mesh.wait_ready()
        yield running
    finally:
        running.mesh.stop()


def handshake_serial(port: int, store: CertStore, identity: str | None, server_name: str = "localhost",
                     roots: Path | None = None) -> int:
    """The serial of the certificate a TLS server on `port` presents (we show `identity`'s)."""
    context = ssl.create_default_context(cafile=str(roots or store.bundle_path))
    if identity:
        context.load_cert_chain(store.cert_path(identity), store.key_path(identity))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=server_name) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def first_bytes(port: int, roots: Path, client: CertStore) -> bytes:
    """What a TLS server sends first to a client showing `client`'s Envoy certificate (b"": closed)."""
    context = ssl.create_default_context(cafile=str(roots))
    context.load_cert_chain(client.cert_path(ENVOY), client.key_path(ENVOY))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        try:
            return tls.recv(1)
        except (ssl.SSLError, ConnectionResetError):
            return b""


def health_check(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    target = f"127.0.0.1:{port}"
    options = [("grpc.ssl_target_name_override", MODEL_SERVER)]
    channel = (grpc.secure_channel(target, credentials, options) if credentials
               else grpc.insecure_channel(target))
    with channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def test_calls_go_through_envoy_over_mutual_tls(tls_mesh):
    with tls_mesh.client() as client:
        assert client.embedding.embed(MODEL, ["hello"]).dimensions == 384
        assert MODEL in [m.id for m in client.registry.list_models()]  # the control server, over mTLS
    context = ssl.create_default_context(cafile=str(tls_mesh.front_certs.bundle_path))
    request = urllib.request.Request(f"https://{tls_mesh.front}/v1/models/{MODEL}:embed",
                                     data=json.dumps({"texts": ["hello"]}).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60, context=context) as reply:
        assert len(json.load(reply)["embeddings"][0]["values"]) == 384
    # Usage went from the model server to control over mutual TLS.
    poll(lambda: server_reports(tls_mesh.mesh.state_dir / "aimesh.db") >= 2, "the servers' usage reports")


def test_status_and_job_workers_speak_tls_where_the_mesh_does(tls_mesh):
    """aimesh status probes the servers with the mesh's client certificate and reads the
    registry over the front door's TLS; the job worker calls the TLS front door."""
    mesh = tls_mesh.mesh
    out = subprocess.run(
        [sys.executable, "-m", "aimesh_servers.cli", "status", "--json", "--front", f"127.0.0.1:{mesh.port}",
         "--admin-port", str(mesh.admin_port), "--state-dir", str(mesh.state_dir)],
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    (model,) = [m for m in json.loads(out.stdout)["models"] if m["id"] == MODEL]
    states = [e["state"] for pool in model["pools"] for e in pool["endpoints"]]
    assert states and set(states) == {"up"}, states
    with tls_mesh.client() as client:
        job = client.jobs.submit([embedding_pb2.EmbedRequest(model=MODEL, texts=["over TLS"])])
        done = client.jobs.wait(job, timeout=120)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done


def server_reports(db: Path) -> int:
    """Usage records the model server reported to control (origin 'server')."""
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        return conn.execute("SELECT count(*) FROM usage_records WHERE served_model = ? AND origin = 'server'",
                            (MODEL,)).fetchone()[0]


def test_front_door_serves_tls_with_the_given_certificate(tls_mesh):
    front = tls_mesh.front_certs
    assert handshake_serial(tls_mesh.mesh.port, front, None) == front.leaf(FRONT_DOOR).serial_number
    with pytest.raises(OSError):  # plaintext HTTP to a TLS listener: the connection is closed
        urllib.request.urlopen(f"http://{tls_mesh.front}/healthz", timeout=10)


def test_a_model_server_refuses_plaintext_and_foreign_certificates(tls_mesh, tmp_path):
    certs, port = tls_mesh.certs, tls_mesh.server_port
    bundle = certs.bundle_path.read_bytes()

    def credentials(store: CertStore) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(bundle, store.key_path(ENVOY).read_bytes(),
                                            store.cert_path(ENVOY).read_bytes())

    foreign = CertStore(tmp_path / "foreign")
    foreign.init(CertSettings())
    assert health_check(port, credentials(certs)) == grpc.StatusCode.OK  # the mesh's own certificate
    assert health_check(port, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert health_check(port, grpc.ssl_channel_credentials(bundle)) == grpc.StatusCode.UNAVAILABLE  # no cert
    assert health_check(port, credentials(foreign)) == grpc.StatusCode.UNAVAILABLE  # another CA
    # The refusal is the TLS handshake's: the server closes the connection instead of sending
    # its HTTP/2 settings (under TLS 1.3 that happens after the client's side of the handshake).
    assert first_bytes(port, certs.bundle_path, certs) and not first_bytes(port, certs.bundle_path, foreign)
    assert health_check(tls_mesh.control_port, None) == grpc.StatusCode.UNAVAILABLE


def rotate(certs: CertStore, *flags: str) -> None:
    subprocess.run([sys.executable, "-m", "aimesh_servers.cli", "certs", "rotate", "--dir", str(certs.root),
                    *flags], check=True, capture_output=True, timeout=120)


def test_rotation_and_ca_rollover_under_load_lose_no_call(tls_mesh):
    certs, server_port, control_port = tls_mesh.certs, tls_mesh.server_port, tls_mesh.control_port
    results: list[str] = []
    stop = threading.Event()

    def caller() -> None:
        with tls_mesh.client() as client:
            while not stop.is_set():
                try:
                    client.embedding.embed(MODEL, [f"call {len(results)}"])
                    results.append("ok")
                except aimesh.AimeshError as exc:
                    results.append(f"{type(exc).__name__}: {exc}")

    def presented(port: int, identity: str) -> bool:
        return handshake_serial(port, certs, ENVOY) == certs.leaf(identity).serial_number

    def calls_after(count: int) -> None:
        start = len(results)
        poll(lambda: len(results) >= start + count, f"{count} more calls", timeout=120)

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    try:
        calls_after(3)
        old = {name: certs.leaf(name).serial_number for name in (MODEL_SERVER, CONTROL, ENVOY)}
        rotate(certs)
        assert all(certs.leaf(name).serial_number != serial for name, serial in old.items())
        poll(lambda: presented(server_port, MODEL_SERVER), "the model server's new certificate")
        poll(lambda: presented(control_port, CONTROL), "the control server's new certificate")
        poll(lambda: tls_mesh.envoy_certs()["client"] == [certs.leaf(ENVOY).serial_number] * 2,
             "Envoy's new client certificate (model and control clusters)")
        calls_after(5)

        # CA rollover: trust old + new, then leaves from the new CA, then the new CA alone.
        old_ca = certs.bundle()[0].serial_number
        rotate(certs, "--new-ca")
        new_ca = certs.bundle()[-1].serial_number
        poll(lambda: set(tls_mesh.envoy_certs()["ca"]) == {old_ca, new_ca}, "Envoy trusting both CAs")
        rotate(certs)
        poll(lambda: presented(server_port, MODEL_SERVER), "a model server certificate of the new CA")
        poll(lambda: tls_mesh.envoy_certs()["client"] == [certs.leaf(ENVOY).serial_number] * 2,
             "Envoy's client certificate of the new CA")
        calls_after(5)
        rotate(certs, "--finish-ca")
        poll(lambda: set(tls_mesh.envoy_certs()["ca"]) == {new_ca}, "Envoy trusting the new CA alone")
        assert presented(server_port, MODEL_SERVER) and presented(control_port, CONTROL)
        reported = server_reports(tls_mesh.mesh.state_dir / "aimesh.db")
        calls_after(5)
        # Usage reports still reach control (the reporter reconnects with its new certificate).
        poll(lambda: server_reports(tls_mesh.mesh.state_dir / "aimesh.db") > reported, "usage reports after the rollover")
    finally:
        stop.set()
        thread.join(120)
    failed = [r for r in results if r != "ok"]
    print(f"\nrotation + CA rollover under a caller loop: {len(failed)} of {len(results)} calls failed")
    assert not failed, f"{len(failed)} of {len(results)} calls failed: {failed[:5]}"
    assert len(results) >= 18
