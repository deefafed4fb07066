"""How the mesh's own tools on this host reach a running mesh when TLS is on.

`aimesh up` writes `<state-dir>/mesh.json`: the front door's address, its certificate
(`--tls-cert`) and the mutual-TLS certificates folder (`--mtls`). `aimesh status`, the
operator page and the job workers read it, so they speak TLS exactly where the mesh does:
- the front door is trusted by its own certificate, the file `aimesh up` serves (pinned:
  a leaf issued by any CA will do), checked against the certificate's own name, never
  the address's (127.0.0.1);
- a model server is called directly (health probes) with Envoy's client certificate, and
  verified as the mesh CA's `model-server` identity.
Without the file (a mesh from an older version, or plaintext) everything is plaintext.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from cryptography import x509

from .certs import ENVOY, MODEL_SERVER, CertStore

MESH_FILE = "mesh.json"


@dataclass(frozen=True)
class MeshAccess:
    front_cert: str | None = None  # the front door's certificate (PEM), when it serves TLS
    mesh_certs: str | None = None  # the mutual-TLS certificates folder, with --mtls

    def write(self, state_dir: Path) -> None:
        (state_dir / MESH_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, state_dir: Path) -> MeshAccess:
        try:
            return cls(**json.loads((state_dir / MESH_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return cls()

    # --- the front door ------------------------------------------------------------------

    def front_url(self, front: str, path: str) -> str:
        return f"{'https' if self.front_cert else 'http'}://{front}{path}"

    def http_verify(self) -> ssl.SSLContext | bool:
        """For httpx: trusts exactly the front door's certificate (partial chain: a leaf
        issued by a CA is its own anchor), whatever name the address has."""
        if not self.front_cert:
            return True
        context = ssl.create_default_context(cafile=self.front_cert)
        context.check_hostname = False  # pinned to the certificate instead
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return context

    def front_channel(self, front: str, options: list[tuple[str, object]]) -> grpc.aio.Channel:
        if not self.front_cert:
            return grpc.aio.insecure_channel(front, options=options)
        pem = Path(self.front_cert).read_bytes()
        name = _first_name(pem)
        options = [*options, ("grpc.ssl_target_name_override", name)] if name else options
        return grpc.aio.secure_channel(front, grpc.ssl_channel_credentials(root_certificates=pem), options)

    # --- model servers, directly ---------------------------------------------------------

    def server_channel(self, address: str) -> grpc.Channel:
        if not self.mesh_certs:
            return grpc.insecure_channel(address)
        store = CertStore(self.mesh_certs)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=store.bundle_path.read_bytes(),
            private_key=store.key_path(ENVOY).read_bytes(),
            certificate_chain=store.cert_path(ENVOY).read_bytes())
        return grpc.secure_channel(address, credentials, [("grpc.ssl_target_name_override", MODEL_SERVER)])


def _first_name(pem: bytes) -> str | None:
    """The certificate's first DNS or IP subject alternative name (what gRPC checks)."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for name in names:
        if isinstance(name, x509.DNSName | x509.IPAddress):
            return str(name.value)
    return None
