"""Discovery through Consul: servers register with their local agent, the mesh watches.

ConsulRegistrar (used by ModelServer when AIMESH_CONSUL_HTTP_ADDR is set) registers
each instance as service `aimesh-model-server` with its tags and a gRPC health check
that the agent itself runs; it deregisters at the start of drain. A server that serves
mutual TLS gets a TLS check (GRPCUseTLS, TLSServerName `model-server`, the name every
model server's mesh certificate carries whatever address it is checked at): the agent
then needs `enable_agent_tls_for_checks` and a mesh client certificate in its TLS
settings (consul/tls.hcl), which Consul presents on its checks. A server that dies
without draining turns critical at its next check and leaves the passing list; the
agent removes its registration after DEREGISTER_CRITICAL_AFTER.

ConsulDiscovery long-polls /v1/health/service/aimesh-model-server?passing (blocking
queries) and yields the passing instances on every change. While Consul is
unreachable it keeps the last list (Envoy keeps routing to it) and retries with
backoff. The same code talks to real Consul and to the tests' stand-in.

Credentials. Both send a Consul ACL token (`X-Consul-Token`) from AIMESH_CONSUL_TOKEN or
the file named by AIMESH_CONSUL_TOKEN_FILE: servers one whose policy may write
`aimesh-model-server`, discovery one that may only read it. With a mesh secret
(AIMESH_MESH_SECRET or AIMESH_MESH_SECRET_FILE) the registrar signs each registration,
an HMAC-SHA256 of its id, address, port and tags in the service Meta, and discovery
ignores any registration whose signature does not check: ACLs keep out callers without
a write token, the signature keeps out a registration made with any other token (a
leaked or too broad one, another team's service of the same name), which Consul's
health API gives discovery no way to tell apart (it does not say which token
registered a service).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import consul.aio
import requests

import consul

from ..mesh.certs import MODEL_SERVER
from .discovery import SERVICE_NAME, Instance

log = logging.getLogger(__name__)

CHECK_INTERVAL = "1s"
CHECK_TIMEOUT = "1s"
# Long enough for a slow model load (the check is critical until SERVING) and a restart.
DEREGISTER_CRITICAL_AFTER = "10m"


SIGNATURE_META = "aimesh-signature"


class RegistrationError(RuntimeError):
    pass


def _secret_from_env(name: str) -> str | None:
    """`NAME`, or the contents of the file named by `NAME_FILE` (Docker secrets); None if neither."""
    if value := os.environ.get(name):
        return value
    if path := os.environ.get(f"{name}_FILE"):
        return Path(path).read_text(encoding="utf-8").strip() or None
    return None


def consul_token() -> str | None:
    return _secret_from_env("AIMESH_CONSUL_TOKEN")


def mesh_secret() -> str | None:
    return _secret_from_env("AIMESH_MESH_SECRET")


def signature(secret: str, service_id: str, address: str, port: int, tags: list[str]) -> str:
    """What proves a registration was made by a holder of the mesh secret."""
    message = "\n".join([service_id, address, str(port), *sorted(tags)]).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def parse_http_addr(addr: str) -> tuple[str, int, str]:
    """`host:port` or `http(s)://host:port` (CONSUL_HTTP_ADDR's forms) -> host, port, scheme."""
    parsed = urllib.parse.urlsplit(addr if "//" in addr else f"//{addr}")
    scheme = parsed.scheme or "http"
    try:
        port = parsed.port or (443 if scheme == "https" else 8500)
    except ValueError:
        port = None
    if not parsed.hostname or port is None or scheme not in ("http", "https"):
        raise ValueError(f"Consul address {addr!r} is not host:port or http(s)://host:port")
    return parsed.hostname, port, scheme


class ConsulRegistrar:
    """Registers instances with the Consul agent at `http_addr` (agent HTTP API). Blocking
    HTTP: callers on an event loop run it in a thread. Token and secret default to the
    environment's (see the module doc); `tls`: the servers serve mutual TLS, so the
    agent checks them over TLS."""

    def __init__(self, http_addr: str, timeout_s: float = 5.0, token: str | None = None,
                 secret: str | None = None, tls: bool = False) -> None:
        host, port, scheme = parse_http_addr(http_addr)
        self.http_addr = http_addr
        self.tls = tls
        self.secret = secret or mesh_secret()
        self.client = consul.Consul(host=host, port=port, scheme=scheme, connections_timeout=timeout_s,
                                    token=token or consul_token())

    def register(self, instance: Instance) -> None:
        check = consul.Check.grpc(
            f"{instance.address}:{instance.port}/{instance.grpc_service}",
            interval=CHECK_INTERVAL, timeout=CHECK_TIMEOUT, deregister=DEREGISTER_CRITICAL_AFTER,
        )
        if self.tls:
            check |= {"GRPCUseTLS": True, "TLSServerName": MODEL_SERVER}
        meta = ({SIGNATURE_META: signature(self.secret, instance.id, instance.address, instance.port,
                                           instance.tags)} if self.secret else None)
        try:
            self.client.agent.service.register(
                SERVICE_NAME, service_id=instance.id, address=instance.address, port=instance.port,
                tags=instance.tags, check=check, meta=meta,
            )
        except (consul.ConsulException, requests.RequestException) as exc:
            raise RegistrationError(
                f"cannot register {instance.id} with Consul at {self.http_addr}: {exc}") from exc
        log.info("registered %s with Consul at %s", instance.id, self.http_addr)

    def deregister(self, instance: Instance) -> None:
        """Best effort: if the agent is unreachable the failing check takes over."""
        try:
            self.client.agent.service.deregister(instance.id)
        except (consul.ConsulException, requests.RequestException) as exc:
            log.warning("could not deregister %s from Consul at %s (%s); its health check "
                        "will turn critical instead", instance.id, self.http_addr, exc)


def _resolve(address: str) -> str:
    """Envoy's EDS takes IP literals only; registrations may carry names (compose services)."""
    try:
        ipaddress.ip_address(address)
        return address
    except ValueError:
        pass
    infos = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
    ipv4 = [info for info in infos if info[0] == socket.AF_INET]
    return str((ipv4 or infos)[0][4][0])


def _instances(entries: list[dict[str, Any]], secret: str | None) -> list[Instance]:
    found = []
    for entry in entries:
        service = entry["Service"]
        if secret is not None:
            expected = signature(secret, service["ID"], service.get("Address") or "", service["Port"],
                                 service.get("Tags") or [])
            if not hmac.compare_digest((service.get("Meta") or {}).get(SIGNATURE_META, ""), expected):
                log.warning("ignoring %s: not registered with the mesh's credentials (no valid %s)",
                            service["ID"], SIGNATURE_META)
                continue
        # An empty service address means "the node's address" in Consul.
        address = service.get("Address") or entry["Node"]["Address"]
        try:
            address = _resolve(address)
        except OSError as exc:
            log.warning("skipping %s: cannot resolve %r (%s)", service["ID"], address, exc)
            continue
        instance = Instance.from_tags(service["ID"], address, service["Port"], service.get("Tags") or [])
        if instance is None:
            log.warning("skipping %s: its tags name no model and pool", service["ID"])
            continue
        found.append(instance)
    return sorted(found)


class ConsulDiscovery:
    """Passing instances of `aimesh-model-server`, from blocking queries on the health API."""

    def __init__(self, http_addr: str, wait_s: float = 30.0, min_query_gap_s: float = 0.1,
                 max_backoff_s: float = 10.0, token: str | None = None, secret: str | None = None) -> None:
        self.host, self.port, self.scheme = parse_http_addr(http_addr)
        self.http_addr = http_addr
        self.token = token or consul_token()
        self.secret = secret or mesh_secret()
        if self.secret is None:
            log.warning("no mesh secret (AIMESH_MESH_SECRET): every passing %s registration is "
                        "trusted, whoever made it", SERVICE_NAME)
        self.wait_s = wait_s
        self.min_query_gap_s = min_query_gap_s  # rate limit: a churning index must not busy-loop
        self.max_backoff_s = max_backoff_s

    async def watch(self) -> AsyncIterator[list[Instance]]:
        client = consul.aio.Consul(host=self.host, port=self.port, scheme=self.scheme,
                                   verify=self.scheme == "https", token=self.token)
        index = 0
        last: list[Instance] | None = None
        backoff = 0.0
        started = 0.0
        try:
            while True:
                await asyncio.sleep(max(0.0, started + self.min_query_gap_s - time.monotonic()))
                started = time.monotonic()
                try:
                    # A blocking query answers within wait + wait/16 (Consul's jitter).
                    async with asyncio.timeout(self.wait_s * 17 / 16 + 5):
                        new_index, entries = await client.health.service(
                            SERVICE_NAME, index=index or None, wait=f"{self.wait_s:g}s", passing=True)
                except (consul.ConsulException, aiohttp.ClientError, TimeoutError) as exc:
                    index = 0  # the agent may come back restarted, with fresh indexes: re-read first
                    backoff = min(self.max_backoff_s, backoff * 2 or 0.5)
                    log.warning("Consul at %s unreachable (%s): keeping the last %d instance(s), "
                                "retrying in %.1fs", self.http_addr, str(exc) or type(exc).__name__,
                                len(last or []), backoff)
                    await asyncio.sleep(backoff)
                    continue
                if backoff:
                    log.info("Consul at %s reachable again", self.http_addr)
                    backoff = 0.0
                # Consul's blocking-query rules: reset an index that goes backwards, never block on 0.
                new_index = int(new_index)
                index = max(1, new_index if new_index >= index else 0)
                current = await asyncio.to_thread(_instances, entries or [], self.secret)
                if current != last:
                    last = current
                    yield current
        finally:
            await client.close()
