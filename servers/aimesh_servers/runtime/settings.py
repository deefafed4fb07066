"""Typed settings of a model server, read once from the environment (AIMESH_*) and flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .tls import TlsFiles


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIMESH_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(0, description="0 picks a free port; the chosen one is printed")
    pool: str = Field("local", description="pool name reported as the one that served a call")
    max_concurrency: int = Field(
        4, ge=1, description="slots (calls run at once) of a capability whose engine states no capacity")
    max_queue: int = Field(
        32, ge=0, description="calls that may wait for a slot; one more is refused at once")
    queue_timeout_s: float = Field(
        2.0, ge=0, description="longest a call waits for a slot (less when its deadline is nearer)")
    spare_threads: int = Field(
        4, ge=1, description="threads beyond the slots in the server's executor (helpers, hand-offs)")
    watchdog_stall_s: float = Field(
        60.0, ge=0, description="NOT_SERVING while admitted calls make no progress this long (0: off)")
    drain_delay_s: float = Field(
        2.0, ge=0, description="after SIGTERM: keep serving while NOT_SERVING propagates"
    )
    drain_grace_s: float = Field(10.0, ge=0, description="then: time calls in flight get to finish")
    torch_threads: int = Field(2, ge=1)
    registry_dir: Path | None = Field(
        None, description="register in this local registration folder (the embedded default)"
    )
    advertise_host: str | None = Field(None, description="address others reach us at (default: host)")
    consul_http_addr: str | None = Field(
        None, description="register with the Consul agent at host:port (takes precedence over registry_dir)"
    )
    usage_addr: str | None = Field(
        None, description="the mesh's usage collector (host:port): every call's usage is reported there"
    )
    metrics_port: int | None = Field(
        None, description="serve Prometheus /metrics on this port (0 picks a free one, printed); unset: off"
    )
    otlp_endpoint: str | None = Field(
        None, description="export trace spans over OTLP/gRPC to host:port; unset: tracing off")
    trace_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="share of new traces sampled (a caller's sampled flag wins)")
    cache_enabled: bool = Field(
        False, description="answer deterministic requests from the response cache (runtime/cache.py)")
    cache_ttl_s: float = Field(3600.0, gt=0, description="how long a cached answer is served")
    cache_scope: Literal["tenant", "shared"] = Field(
        "tenant", description="tenant: entries are never served to another tenant; shared: to everyone")
    cache_url: str | None = Field(
        None, description="redis://... shared by every replica; unset: this process's memory")
    cache_prefix: str = Field("aimesh:cache:", description="prefix of the cache's Redis keys")
    cache_max_entries: int = Field(10_000, ge=1, description="memory cache: entries kept (LRU)")
    cache_max_bytes: int = Field(256 * 1024 * 1024, ge=1, description="memory cache: bytes kept (LRU)")
    cache_max_entry_bytes: int = Field(
        16 * 1024 * 1024, ge=1, description="a larger answer is not cached")
    tls_cert: Path | None = Field(
        None, description="serve mutual TLS with this certificate (PEM); with tls_key and tls_ca")
    tls_key: Path | None = Field(None, description="the certificate's private key (PEM)")
    tls_ca: Path | None = Field(
        None, description="CA bundle (PEM) a client certificate must chain to; also what we trust as a client")

    def tls_files(self) -> TlsFiles | None:
        """The mTLS files, or None for plaintext; all three or none."""
        given = [self.tls_cert, self.tls_key, self.tls_ca]
        if not any(given):
            return None
        if not all(given):
            raise ValueError("AIMESH_TLS_CERT, AIMESH_TLS_KEY and AIMESH_TLS_CA go together")
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_ca)  # type: ignore[arg-type]
