"""`aimesh certs`: the mesh CA, its leaves, rotation and CA rollover; the files servers
reload (runtime.tls) and the Envoy config that uses them (validated by the real Envoy)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import stat
import subprocess

import grpc
import pytest
import yaml
from aimesh.usage.v1 import usage_ingest_pb2 as ingest_pb
from aimesh.usage.v1 import usage_ingest_pb2_grpc as ingest_grpc
from aimesh_servers.cli import main
from aimesh_servers.mesh.certs import (
    CONTROL,
    ENVOY,
    ENVOY_CLIENT_SECRET,
    FRONT_DOOR,
    MESH_CA_SECRET,
    MODEL_SERVER,
    CertSettings,
    CertStore,
)
from aimesh_servers.mesh.controller import EndpointController
from aimesh_servers.mesh.envoy_config import MeshSpec, control_cluster
from aimesh_servers.mesh.envoy_process import envoy_binary, write_config
from aimesh_servers.registry.schema import load_registry
from aimesh_servers.runtime.accounting import CallAccount
from aimesh_servers.runtime.settings import ServerSettings
from aimesh_servers.runtime.tls import TlsFiles
from aimesh_servers.runtime.usage_reporter import UsageReporter
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

LEAVES = (MODEL_SERVER, CONTROL, ENVOY)


@pytest.fixture
def store(tmp_path) -> CertStore:
    certs = CertStore(tmp_path / "certs")
    certs.init(CertSettings(hosts=["models.internal"], front_door_hosts=["mesh.example"], leaf_hours=12))
    return certs


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError):
        return False
    return True


def sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n) for n in ext.get_values_for_type(x509.DNSName)} | {
        str(n) for n in ext.get_values_for_type(x509.IPAddress)}


def test_init_makes_a_p256_ca_and_short_lived_leaves_for_every_identity(store):
    ca, ca_key = store.ca()
    assert isinstance(ca_key.curve, ec.SECP256R1)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE((store.root / "ca.key").stat().st_mode) == 0o600
    for name in (*LEAVES, FRONT_DOOR):
        cert = store.leaf(name)
        assert issued_by(cert, ca) and isinstance(cert.public_key().curve, ec.SECP256R1)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert datetime.timedelta(hours=12) <= lifetime <= datetime.timedelta(hours=12, minutes=6)
        assert stat.S_IMODE(store.key_path(name).stat().st_mode) == 0o600
    server = store.leaf(MODEL_SERVER)
    assert {"model-server", "localhost", "127.0.0.1", "text", "embedding", "models.internal"} <= sans(server)
    assert ipaddress.ip_address("127.0.0.1") in server.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage)
    assert list(store.leaf(ENVOY).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert sans(store.leaf(FRONT_DOOR)) == {"mesh.example"}
    with pytest.raises(FileExistsError):  # never overwrites a CA
        store.init(CertSettings())


def test_sds_files_carry_the_current_material_one_secret_each(store):
    client = yaml.safe_load(store.sds_path(ENVOY_CLIENT_SECRET).read_text())["resources"]
    assert [r["name"] for r in client] == [ENVOY_CLIENT_SECRET]
    assert client[0]["tls_certificate"]["certificate_chain"]["inline_string"] == store.cert_path(ENVOY).read_text()
    assert stat.S_IMODE(store.sds_path(ENVOY_CLIENT_SECRET).stat().st_mode) == 0o600
    ca = yaml.safe_load(store.sds_path(MESH_CA_SECRET).read_text())["resources"]
    assert ca[0]["validation_context"]["trusted_ca"]["inline_string"] == store.bundle_path.read_text()


def test_rotate_issues_new_leaves_from_the_same_ca(store):
    before = {name: store.leaf(name).serial_number for name in LEAVES}
    ca_before = store.ca_path.read_bytes()
    store.rotate_leaves()
    assert all(store.leaf(name).serial_number != serial for name, serial in before.items())
    assert store.ca_path.read_bytes() == ca_before
    assert all(issued_by(store.leaf(name), store.ca()[0]) for name in LEAVES)
    client = yaml.safe_load(store.sds_path(ENVOY_CLIENT_SECRET).read_text())["resources"][0]
    assert client["tls_certificate"]["certificate_chain"]["inline_string"] == store.cert_path(ENVOY).read_text()


def test_ca_rollover_overlaps_old_and_new_ca_then_drops_the_old(store):
    old_ca = store.ca()[0]
    old_leaf = store.leaf(MODEL_SERVER)
    store.start_ca_rollover()
    new_ca = store.ca()[0]
    assert new_ca != old_ca and store.bundle() == [old_ca, new_ca]
    assert store.leaf(MODEL_SERVER) == old_leaf  # leaves wait until every party trusts the new CA
    with pytest.raises(ValueError, match="not yet issued by the new CA"):
        store.finish_ca_rollover()
    store.rotate_leaves()
    assert all(issued_by(store.leaf(name), new_ca) for name in LEAVES)
    assert any(issued_by(old_leaf, ca) for ca in store.bundle())  # open connections' peers still trusted
    store.finish_ca_rollover()
    assert store.bundle() == [new_ca]
    ca_sds = yaml.safe_load(store.sds_path(MESH_CA_SECRET).read_text())["resources"][0]
    assert x509.load_pem_x509_certificates(
        ca_sds["validation_context"]["trusted_ca"]["inline_string"].encode()) == [new_ca]


def test_tls_files_take_a_rotation_only_as_a_matching_pair(store):
    files = TlsFiles(store.cert_path(MODEL_SERVER), store.key_path(MODEL_SERVER), store.bundle_path)
    assert files.changed() is not None and files.changed() is None
    other = CertStore(store.root.parent / "other")
    other.init(CertSettings())
    # Half a rotation: a new key beside the old certificate is not taken.
    store.key_path(MODEL_SERVER).write_bytes(other.key_path(MODEL_SERVER).read_bytes())
    assert files.changed() is None
    with pytest.raises(ValueError, match="not a pair"):
        files.read()
    store.cert_path(MODEL_SERVER).write_bytes(other.cert_path(MODEL_SERVER).read_bytes())
    material = files.changed()
    assert material is not None and material.cert == other.cert_path(MODEL_SERVER).read_bytes()


def test_server_settings_take_all_three_tls_files_or_none(store):
    assert ServerSettings().tls_files() is None
    with pytest.raises(ValueError, match="go together"):
        ServerSettings(tls_cert=store.cert_path(MODEL_SERVER)).tls_files()
    files = ServerSettings(tls_cert=store.cert_path(MODEL_SERVER), tls_key=store.key_path(MODEL_SERVER),
                           tls_ca=store.bundle_path).tls_files()
    assert files is not None and files.read().ca == store.bundle_path.read_bytes()


def test_cli_init_and_rotate(tmp_path, capsys):
    folder = tmp_path / "c"
    assert main(["certs", "rotate", "--dir", str(folder)]) == 2  # nothing to rotate yet
    assert main(["certs", "init", "--dir", str(folder), "--leaf-hours", "2"]) == 0
    serial = CertStore(folder).leaf(ENVOY).serial_number
    assert main(["certs", "rotate", "--dir", str(folder)]) == 0
    assert CertStore(folder).leaf(ENVOY).serial_number != serial
    assert f"{CertStore(folder).leaf(ENVOY).serial_number:x}" in capsys.readouterr().out


def test_envoy_accepts_mutual_tls_upstreams_and_a_tls_front_door(tmp_path, store):
    spec = MeshSpec(registry=load_registry(), state_dir=tmp_path / "state", control_port=50000,
                    mesh_certs=store.root,
                    front_tls=(store.cert_path(FRONT_DOOR), store.key_path(FRONT_DOOR)))
    config = write_config(spec, EndpointController(spec, spec.registry))
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    bootstrap = yaml.safe_load(config.read_text())
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    for name, peer in (("control", CONTROL), *((n, MODEL_SERVER) for n in clusters if n.startswith("model_"))):
        context = clusters[name]["transport_socket"]["typed_config"]
        assert context["common_tls_context"]["combined_validation_context"]["default_validation_context"][
            "match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": peer}}]
        sds = context["common_tls_context"]["tls_certificate_sds_secret_configs"][0]["sds_config"]
        assert sds["path_config_source"]["watched_directory"]["path"] == str(store.sds_dir)
    listener = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]
    assert listener["transport_socket"]["typed_config"]["common_tls_context"]["alpn_protocols"] == ["h2", "http/1.1"]
    plaintext = MeshSpec(registry=load_registry(), state_dir=tmp_path, control_port=1)
    assert "transport_socket" not in control_cluster(plaintext)


class _Collector(ingest_grpc.UsageIngestServiceServicer):
    """A usage collector behind mutual TLS that notes the client certificate of each batch."""

    def __init__(self) -> None:
        self.client_serials: list[int] = []

    async def ReportCalls(self, request, context):
        [pem] = context.auth_context()["x509_pem_cert"]
        self.client_serials.append(x509.load_pem_x509_certificate(pem).serial_number)
        return ingest_pb.ReportCallsResponse(accepted=len(request.records))


async def test_usage_reporter_calls_control_with_its_certificate_and_takes_a_rotation(store):
    collector = _Collector()
    server = grpc.aio.server()
    ingest_grpc.add_UsageIngestServiceServicer_to_server(collector, server)
    control = TlsFiles(store.cert_path(CONTROL), store.key_path(CONTROL), store.bundle_path)
    port = server.add_secure_port("127.0.0.1:0", control.server_credentials())
    await server.start()
    reporter = UsageReporter(f"127.0.0.1:{port}", TlsFiles(
        store.cert_path(MODEL_SERVER), store.key_path(MODEL_SERVER), store.bundle_path), interval_s=0.05)
    reporter.start()
    try:
        async def reported_by(serial: int) -> None:
            reporter.submit(CallAccount(method="/aimesh.embedding.v1.EmbeddingService/Embed",
                                        request_id="r", tenant="t", requested_model="m"))
            async with asyncio.timeout(30):
                while serial not in collector.client_serials:
                    await asyncio.sleep(0.05)

        await reported_by(store.leaf(MODEL_SERVER).serial_number)
        store.rotate_leaves()
        await reported_by(store.leaf(MODEL_SERVER).serial_number)  # a new channel, the new certificate
    finally:
        await reporter.close()
        await server.stop(0)
