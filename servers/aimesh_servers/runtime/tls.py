"""Mutual TLS for model servers and the control server (AIMESH_TLS_CERT/KEY/CA).

A server serves TLS and requires a client certificate signed by a CA of the bundle. It
reloads its certificate, key and CA bundle on rotation without a restart: gRPC asks the
fetcher before every new handshake, and the fetcher re-reads the files when one changed
(connections already open keep the certificate they were made with). A certificate and
key that do not match (a rotation half written) are not taken: the previous pair stays
until the next handshake finds a matching one.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)

# The name clients check in the control server's certificate, whatever address they dial.
CONTROL_SERVER_NAME = "control"


@dataclass(frozen=True)
class TlsMaterial:
    cert: bytes
    key: bytes
    ca: bytes


class TlsFiles:
    """A certificate, its key and the trusted CA bundle, as files that rotate."""

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self.cert, self.key, self.ca = Path(cert), Path(key), Path(ca)
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] = ()

    def _current_stamp(self) -> tuple[int, ...]:
        return tuple(p.stat().st_mtime_ns for p in (self.cert, self.key, self.ca))

    def read(self) -> TlsMaterial:
        """The files' contents; ValueError when the certificate and key are not a pair."""
        material = TlsMaterial(self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes())
        public = x509.load_pem_x509_certificate(material.cert).public_key()
        private = serialization.load_pem_private_key(material.key, None).public_key()
        raw = serialization.PublicFormat.SubjectPublicKeyInfo
        if public.public_bytes(serialization.Encoding.DER, raw) != private.public_bytes(
                serialization.Encoding.DER, raw):
            raise ValueError(f"{self.cert} and {self.key} are not a pair (rotation under way?)")
        return material

    def changed(self) -> TlsMaterial | None:
        """The new material if a file changed since the last successful read, else None."""
        with self._lock:
            try:
                stamp = self._current_stamp()
                if stamp == self._stamp:
                    return None
                material = self.read()
            except (OSError, ValueError) as exc:
                log.warning("keeping the current TLS certificate: %s", exc)
                return None
            self._stamp = stamp
            return material

    def server_credentials(self) -> grpc.ServerCredentials:
        initial = self.changed() or self.read()

        def config(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], material.ca)

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            material = self.changed()
            if material is None:
                return None
            log.info("TLS: certificate reloaded from %s", self.cert)
            return config(material)

        return grpc.dynamic_ssl_server_credentials(config(initial), fetch, require_client_authentication=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client side (a model server calling control): this certificate, this CA bundle.
        Fixed at channel creation: callers make a new channel when `changed()` says so."""
        material = self.read()
        return grpc.ssl_channel_credentials(material.ca, material.key, material.cert)
