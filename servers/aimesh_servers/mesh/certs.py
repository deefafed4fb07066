"""`aimesh certs`: the mesh's own CA and the certificates of its parties (mutual TLS).

A certificates folder holds:

    ca.pem, ca.key         the CA that signs leaves now (ECDSA P-256; the key is 0600)
    ca-bundle.pem          every CA a party trusts: the current one, plus the previous
                           one while a CA rollover overlaps
    <identity>/cert.pem, key.pem
                           model-server  every model server (one shared identity); also
                                         its client certificate for calls to control
                           control       the control server (registry, tenancy, usage ingest)
                           envoy         Envoy's client certificate for upstream calls
                           consul-agent  the Consul agent's client certificate for its
                                         gRPC health checks of the model servers (its key
                                         is group-readable: the agent runs as another user)
                           front-door    only with --front-door-host: for `aimesh up
                                         --tls-cert/--tls-key` (read when Envoy starts)
    sds/*.yaml             Envoy's client certificate and the CA bundle as SDS resources
                           (file-based SDS, one secret per file): Envoy picks up a rotation
                           without a restart
    settings.json          hosts and lifetimes, reused by `rotate`

Every file is written to a temporary name and renamed into place (Envoy's directory
watch sees a rename; a reader never sees half a file). A leaf's key is written before its
certificate, and readers check that the pair matches (runtime.tls).

Rotation: `aimesh certs rotate` issues new leaves from the current CA. A CA rollover
takes three steps so that no party ever meets a certificate it does not trust yet:
`rotate --new-ca` makes a new CA the signer and trusts old + new (leaves untouched);
then `rotate` issues leaves from the new CA; then `rotate --finish-ca` drops the old CA.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MODEL_SERVER, CONTROL, ENVOY, FRONT_DOOR = "model-server", "control", "envoy", "front-door"
# Its own identity rather than Envoy's: the agent's checks may only read health, and a
# leaked agent key must not be usable as the front door's upstream identity.
CONSUL_AGENT = "consul-agent"
# Envoy's SDS secret names (one file each in sds/).
ENVOY_CLIENT_SECRET, MESH_CA_SECRET = "envoy-client", "mesh-ca"
# The compose services a model server or the control server is reached by.
COMPOSE_HOSTS = ("text", "image", "stt", "tts", "vision", "embedding", "mesh")


@dataclass
class CertSettings:
    hosts: list[str] = field(default_factory=list)  # extra DNS names / IPs of servers and control
    front_door_hosts: list[str] = field(default_factory=list)  # empty: no front-door certificate
    ca_days: int = 365
    leaf_hours: int = 24 * 7


@dataclass(frozen=True)
class Identity:
    name: str
    sans: tuple[str, ...]
    server: bool
    client: bool


def identities(settings: CertSettings) -> list[Identity]:
    loopback = ("localhost", "127.0.0.1", "::1")
    out = [
        # Model servers call control (usage reports): they also act as clients.
        Identity(MODEL_SERVER, (MODEL_SERVER, *loopback, *COMPOSE_HOSTS, *settings.hosts), True, True),
        Identity(CONTROL, (CONTROL, *loopback, "mesh", *settings.hosts), True, True),
        Identity(ENVOY, (ENVOY,), False, True),
        Identity(CONSUL_AGENT, (CONSUL_AGENT,), False, True),
    ]
    if settings.front_door_hosts:
        out.append(Identity(FRONT_DOOR, tuple(settings.front_door_hosts), True, False))
    return out


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, private: bool = False, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    mode = mode if mode is not None else 0o600 if private else 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def new_ca(days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    # A name of its own per CA: during a rollover two CAs are trusted side by side.
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aimesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"aimesh mesh CA {serial:x}"[:64])])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(identity: Identity, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
          hours: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if identity.server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if identity.client else [])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aimesh"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(hours=hours), ca.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([_san(n) for n in dict.fromkeys(identity.sans)]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


class CertStore:
    """A certificates folder (see the module doc)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def ca_path(self) -> Path:
        return self.root / "ca.pem"

    @property
    def bundle_path(self) -> Path:
        return self.root / "ca-bundle.pem"

    def cert_path(self, identity: str) -> Path:
        return self.root / identity / "cert.pem"

    def key_path(self, identity: str) -> Path:
        return self.root / identity / "key.pem"

    def sds_path(self, secret: str) -> Path:
        return self.root / "sds" / f"{secret}.yaml"

    @property
    def sds_dir(self) -> Path:
        return self.root / "sds"

    def exists(self) -> bool:
        return self.ca_path.exists() and self.bundle_path.exists()

    def settings(self) -> CertSettings:
        return CertSettings(**json.loads((self.root / "settings.json").read_text()))

    def ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
        key = serialization.load_pem_private_key((self.root / "ca.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    def bundle(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.bundle_path.read_bytes())

    def leaf(self, identity: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path(identity).read_bytes())

    def init(self, settings: CertSettings) -> None:
        """A new CA and every leaf; refuses to overwrite an existing CA."""
        if self.ca_path.exists():
            raise FileExistsError(f"{self.root} already holds a mesh CA: use `aimesh certs rotate`")
        self.root.mkdir(parents=True, exist_ok=True)
        _write(self.root / "settings.json", json.dumps(asdict(settings), indent=1).encode())
        ca, ca_key = new_ca(settings.ca_days)
        self._write_ca(ca, ca_key, [ca])
        self.rotate_leaves()

    def _write_ca(self, ca: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                  trusted: list[x509.Certificate]) -> None:
        _write(self.root / "ca.key", _key_pem(key), private=True)
        _write(self.ca_path, _cert_pem(ca))
        _write(self.bundle_path, b"".join(_cert_pem(c) for c in trusted))
        self._write_ca_sds()

    def rotate_leaves(self) -> None:
        """New leaves for every identity, signed by the current CA."""
        settings = self.settings()
        ca, ca_key = self.ca()
        for identity in identities(settings):
            cert, key = issue(identity, ca, ca_key, settings.leaf_hours)
            # The Consul image runs its agent as its own user: it reads the key as a group member.
            _write(self.key_path(identity.name), _key_pem(key),
                   mode=0o640 if identity.name == CONSUL_AGENT else 0o600)
            _write(self.cert_path(identity.name), _cert_pem(cert))
        self._write_leaf_sds()

    def start_ca_rollover(self) -> None:
        """A new CA signs from now on; parties trust the old and the new one."""
        trusted = self.bundle()
        ca, key = new_ca(self.settings().ca_days)
        self._write_ca(ca, key, [*trusted, ca])

    def finish_ca_rollover(self) -> None:
        """Trust only the current CA (every leaf must have been re-issued by it)."""
        ca, key = self.ca()
        stale = [i.name for i in identities(self.settings())
                 if not self.cert_path(i.name).exists() or self.leaf(i.name).issuer != ca.subject]
        if stale:
            raise ValueError(f"leaves not yet issued by the new CA: {stale}; run `aimesh certs rotate` first")
        self._write_ca(ca, key, [ca])

    def _write_ca_sds(self) -> None:
        _write(self.sds_path(MESH_CA_SECRET), sds_resource(MESH_CA_SECRET, {
            "validation_context": {"trusted_ca": {"inline_string": self.bundle_path.read_text()}}}))

    def _write_leaf_sds(self) -> None:
        _write(self.sds_path(ENVOY_CLIENT_SECRET), sds_resource(ENVOY_CLIENT_SECRET, {"tls_certificate": {
            "certificate_chain": {"inline_string": self.cert_path(ENVOY).read_text()},
            "private_key": {"inline_string": self.key_path(ENVOY).read_text()}}}), private=True)


def sds_resource(name: str, body: dict) -> bytes:
    """One Envoy Secret as a file-based SDS response (Envoy takes exactly one per file)."""
    return yaml.safe_dump({"resources": [{
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": name, **body}]}, sort_keys=False).encode()


def ensure(root: Path, settings: CertSettings | None = None) -> CertStore:
    """The store at `root`, created with `settings` if it holds no CA yet."""
    store = CertStore(root)
    if not store.exists():
        store.init(settings or CertSettings())
    return store


def _describe(store: CertStore) -> str:
    lines = [f"certificates in {store.root}:"]
    for ca in store.bundle():
        lines.append(f"  trusts CA  {ca.subject.rfc4514_string()} serial {ca.serial_number:x} "
                     f"until {ca.not_valid_after_utc:%Y-%m-%d}")
    for identity in identities(store.settings()):
        if not store.cert_path(identity.name).exists():  # a folder made before the identity was
            lines.append(f"  {identity.name:<13} none yet: `aimesh certs rotate` issues it")
            continue
        cert = store.leaf(identity.name)
        lines.append(f"  {identity.name:<13} serial {cert.serial_number:x} until "
                     f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    return "\n".join(lines)


def add_certs_parser(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser("certs", help="the mesh CA and certificates for mutual TLS (init, rotate)")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_sub.add_parser("init", help="create a mesh CA and every certificate")
    rotate = certs_sub.add_parser("rotate", help="issue new leaf certificates (or roll the CA over)")
    for parser in (init, rotate):
        parser.add_argument("--dir", default=".aimesh/certs", help="certificates folder (default .aimesh/certs)")
    init.add_argument("--host", action="append", default=[],
                      help="another DNS name or IP the servers and control are reached by (repeatable)")
    init.add_argument("--front-door-host", action="append", default=[],
                      help="also issue a front-door certificate for this name (repeatable)")
    init.add_argument("--ca-days", type=int, default=365, help="CA lifetime (default 365 days)")
    init.add_argument("--leaf-hours", type=int, default=24 * 7, help="leaf lifetime (default 168 hours)")
    step = rotate.add_mutually_exclusive_group()
    step.add_argument("--new-ca", action="store_true",
                      help="rollover step 1: a new CA signs from now on, old and new are trusted")
    step.add_argument("--finish-ca", action="store_true",
                      help="rollover step 3 (after a plain rotate): trust only the new CA")
    certs.set_defaults(func=run_certs)


def run_certs(args: argparse.Namespace) -> int:
    store = CertStore(args.dir)
    if args.certs_command == "init":
        store.init(CertSettings(hosts=args.host, front_door_hosts=args.front_door_host,
                                ca_days=args.ca_days, leaf_hours=args.leaf_hours))
    elif not store.exists():
        print(f"no mesh CA in {store.root}: run `aimesh certs init` first")
        return 2
    elif args.new_ca:
        store.start_ca_rollover()
        print("new CA made; parties now trust old + new. Next: `aimesh certs rotate` once they reloaded")
    elif args.finish_ca:
        store.finish_ca_rollover()
    else:
        store.rotate_leaves()
    print(_describe(store))
    return 0
