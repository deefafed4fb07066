"""The tenancy control plane of one front door, as `aimesh up` runs it beside Envoy.

It owns the database (tenants, tokens, keys, usage; SQLite by default, PostgreSQL with
`--database`), the limit counters (memory by default, Redis with `--redis`: shared by
every control plane of a deployment), and wires:
  servers' usage reports + Envoy's access log -> UsageCollector -> UsageRecorder (rows)
                                                               -> QuotaController (charges)
  TenantStore + counters -> QuotaController -> route metadata (RDS) and JWT keys (ECDS)
It serves TenantService, UsageService and the internal UsageIngestService from the
control server. Several control planes may share one database and one Redis: each
polls the store's version row, so a change made through any of them reaches every
front door within about a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from aimesh.usage.v1 import usage_ingest_pb2, usage_ingest_pb2_grpc

from ..jobs.settings import JobSettings
from ..jobs.system import JobSystem
from ..mesh.envoy_config import MeshSpec
from ..mesh.tenancy_envoy import (
    MESH_AUDIENCE,
    MESH_ISSUER,
    JwtProvider,
    write_jwt_config,
    write_routes,
)
from ..registry.schema import Registry
from .bootstrap import LocalAccess, bootstrap_local
from .collector import AccessLogTail, IngestServicer, UsageCollector
from .counters import MemoryCounters, RedisCounters, WindowCounters
from .db import make_engine, migrate, sqlite_url
from .keys import TrustedIssuer
from .quota import LimitRule, QuotaController, Snapshot, TenantPolicy
from .recorder import UsageRecorder
from .servicer import TenantCapability
from .store import TenantStore
from .usage_servicer import UsageCapability

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TenancySettings:
    enforce: bool = True  # False: `--no-tenancy` (usage is still recorded)
    database_url: str | None = None
    redis_url: str | None = None
    front_doors: int = 1  # Envoy instances sharing these limits
    trusted_issuers: tuple[TrustedIssuer, ...] = ()


class IngestCapability:
    """UsageIngestService (internal: the front door never routes it) in the control server."""

    models: Sequence = ()
    service_names: Sequence[str] = (
        usage_ingest_pb2.DESCRIPTOR.services_by_name["UsageIngestService"].full_name,)

    def __init__(self, collector: UsageCollector) -> None:
        self.servicer = IngestServicer(collector)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        usage_ingest_pb2_grpc.add_UsageIngestServiceServicer_to_server(self.servicer, server)

    def load(self) -> None:
        """Nothing to load."""


def _policy(tenant) -> TenantPolicy:  # type: ignore[no-untyped-def]
    return TenantPolicy(
        id=tenant.id, disabled=tenant.disabled, capabilities=tenant.allowed_capabilities,
        models=tenant.allowed_models, monthly_budget_usd=tenant.monthly_budget_usd,
        limits=tuple(LimitRule(capability=lim.capability, model=lim.model, kind=lim.kind,
                               limit=lim.limit, window_s=lim.window_s) for lim in tenant.limits),
    )


class TenancyPlane:
    def __init__(self, spec: MeshSpec, registry: Registry, settings: TenancySettings) -> None:
        self.spec = spec
        self.settings = settings
        url = settings.database_url or sqlite_url(spec.state_dir)
        self.engine = make_engine(url)
        migrate(self.engine)
        self.store = TenantStore(self.engine)
        self.recorder = UsageRecorder(self.engine)
        self.counters: WindowCounters = (RedisCounters(settings.redis_url) if settings.redis_url
                                         else MemoryCounters())
        self.quota = QuotaController(load=self._load, counters=self.counters, publish=self._publish,
                                     front_doors=settings.front_doors, enforce=settings.enforce)
        self.collector = UsageCollector(registry, self.recorder.submit, self.quota.charge)
        self.tail = AccessLogTail(spec.state_dir / "access.log", self.collector.feed_edge)
        self.capabilities = [
            TenantCapability(self.store, on_change=self._changed),
            UsageCapability(self.engine, self.store.monthly_budget),
            IngestCapability(self.collector),
        ]
        # Jobs share this database; their workers start once the front door routes (up.py).
        self.jobs = JobSystem(registry, self.engine, self.store, state_dir=spec.state_dir,
                              front=f"127.0.0.1:{spec.port}", enforce=settings.enforce,
                              redis_url=settings.redis_url, settings=JobSettings.from_env(),
                              front_cert=str(spec.front_tls[0]) if spec.front_tls else None)
        self.capabilities.append(self.jobs.capability)
        self._jwks_written: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def bootstrap(self) -> LocalAccess:
        """The local tenant and its tokens (state dir), for the quick start."""
        return bootstrap_local(self.store, self.spec.state_dir)

    def _load(self) -> Snapshot:
        """Reads the store (a worker thread, every second); rewrites the JWT providers when
        the signing keys changed."""
        version = self.store.version()
        if self.settings.enforce:
            jwks = json.dumps(self.store.jwks(), sort_keys=True)
            if jwks != self._jwks_written:
                providers = [JwtProvider("aimesh", MESH_ISSUER, (MESH_AUDIENCE,), jwks)]
                providers += [JwtProvider(f"trusted{i}", t.issuer, t.audiences, json.dumps(t.jwks),
                                          tenant_claim=t.tenant_claim)
                              for i, t in enumerate(self.settings.trusted_issuers)]
                write_jwt_config(self.spec, providers)
                self._jwks_written = jwks
        return Snapshot(tenants={t.id: _policy(t) for t in self.store.list_tenants()},
                        revoked=tuple(self.store.revoked_unexpired()), version=version)

    async def _changed(self) -> None:
        """After an admin change: publish before answering, so the admin's next call (a
        new tenant's first, a revoked token's last) meets the front door already changed."""
        await asyncio.to_thread(self.quota.refresh)

    def _publish(self, admission: dict) -> None:
        write_routes(self.spec, admission)

    async def start(self) -> None:
        """Publishes the first admission state (so the front door enforces before the
        first call), then keeps it current and follows the access log."""
        await asyncio.to_thread(self.quota.refresh)
        self._tasks = [asyncio.create_task(self.quota.run()), asyncio.create_task(self.tail.run())]

    async def close(self) -> None:
        """After the servers drained: every reported call and log line is recorded."""
        await self.jobs.close()
        await asyncio.sleep(0.5)  # Envoy flushes its access log every 200 ms
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.collector.close)
        await asyncio.to_thread(self.recorder.close)
        self.engine.dispose()


def load_issuers(path: str | None) -> tuple[TrustedIssuer, ...]:
    if not path:
        return ()
    from .keys import load_trusted_issuers

    return tuple(load_trusted_issuers(Path(path)))
