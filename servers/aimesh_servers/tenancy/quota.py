"""The quota controller: turns tenants, their limits and what they used into the
admission state every front door enforces.

Two kinds of limit, enforced where each is cheapest and exact enough:
- **requests per window** are counted by the front door itself (a fixed-window counter
  in Envoy's Lua filter, no round trip): each of `front_doors` Envoy instances admits
  `floor(limit / front_doors)` calls per window, so all together never exceed the limit
  (a tenant whose calls land unevenly may be refused a little early, never late);
- **units per window and the monthly budget** are known only once a call ends (the
  servers report tokens, audio seconds... cancelled or not). Every finished call is
  charged to shared counters (Redis in production, memory by default); a tenant whose
  counter reaches its limit is marked blocked until the window (or month) ends, and the
  front doors refuse it from then on. The overshoot is bounded by what the tenant's calls
  in flight produce plus what it starts during one publish interval (the counters are
  read and the front doors' route metadata rewritten at least every `interval_s`, and
  at once when a charge crosses a limit on this control plane).
If the shared counters are unreachable the controller fails open to local counters
(each control plane then enforces units and budgets on what it saw alone) and says so
in its log; requests-per-window limits, enforced in Envoy, are unaffected.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .counters import CountersUnavailable, MemoryCounters, WindowCounters
from .recorder import UsageRow

log = logging.getLogger(__name__)

ALL = "*"


@dataclass(frozen=True)
class LimitRule:
    capability: str  # short name or "*"
    model: str  # "" = every model
    kind: str  # "requests" | "units"
    limit: float
    window_s: int

    def matches(self, capability: str, model: str) -> bool:
        return self.capability in (ALL, capability) and self.model in ("", model)


@dataclass(frozen=True)
class TenantPolicy:
    id: str
    disabled: bool = False
    capabilities: tuple[str, ...] = ()  # empty = all
    models: tuple[str, ...] = ()  # empty = all
    limits: tuple[LimitRule, ...] = ()
    monthly_budget_usd: float = 0.0  # 0 = none


@dataclass(frozen=True)
class Snapshot:
    """What the tenant store says, as the controller needs it."""

    tenants: dict[str, TenantPolicy]
    revoked: tuple[str, ...] = ()
    version: int = 0


def month_key(now: float) -> tuple[str, float]:
    """('YYYY-MM', epoch of the next month's start), UTC."""
    t = datetime.fromtimestamp(now, UTC)
    days = calendar.monthrange(t.year, t.month)[1]
    end = datetime(t.year, t.month, 1, tzinfo=UTC).timestamp() + days * 86400
    return f"{t.year:04d}-{t.month:02d}", end


def units_key(tenant: str, rule: LimitRule, now: float) -> tuple[str, float]:
    window = int(now // rule.window_s)
    key = f"aimesh:units:{tenant}:{rule.capability}:{rule.model or ALL}:{rule.window_s}:{window}"
    return key, (window + 1) * rule.window_s


def budget_key(tenant: str, now: float) -> tuple[str, float]:
    month, end = month_key(now)
    return f"aimesh:cost:{tenant}:{month}", end


@dataclass
class QuotaController:
    load: Callable[[], Snapshot]  # blocking: reads the tenant store
    counters: WindowCounters
    publish: Callable[[dict], None]  # writes the admission state to the front door(s)
    front_doors: int = 1
    enforce: bool = True
    interval_s: float = 1.0
    fallback: WindowCounters = field(default_factory=MemoryCounters)
    _snapshot: Snapshot = field(default_factory=lambda: Snapshot({}))
    _published: dict | None = None
    _version: int = 0
    _degraded: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    # -- charging (called by the usage collector for every finished call) ------------

    def _counters(self) -> WindowCounters:
        return self.fallback if self._degraded else self.counters

    def _add(self, key: str, amount: float, ttl_s: int) -> float:
        try:
            total = self._counters().add(key, amount, ttl_s)
        except CountersUnavailable as exc:
            if not self._degraded:
                log.error("shared counters unavailable (%s): failing open to local counters", exc)
            self._degraded = True
            total = self.fallback.add(key, amount, ttl_s)
        return total

    def charge(self, row: UsageRow, units: float) -> None:
        policy = self._snapshot.tenants.get(row.tenant)
        if policy is None or not row.capability:
            return
        now = row.time.timestamp()
        crossed = False
        if units > 0:
            for rule in policy.limits:
                if rule.kind == "units" and rule.matches(row.capability, row.served_model or row.requested_model):
                    key, _ = units_key(row.tenant, rule, now)
                    crossed |= self._add(key, units, rule.window_s + 60) >= rule.limit
        if row.cost_usd > 0:
            key, _ = budget_key(row.tenant, now)
            total = self._add(key, row.cost_usd, 40 * 86400)
            crossed |= bool(policy.monthly_budget_usd) and total >= policy.monthly_budget_usd
        if crossed:
            self.wake()  # publish now rather than at the next tick

    # -- the admission state ----------------------------------------------------------

    def _read_blocked(self, now: float) -> dict[str, dict[str, dict[str, dict]]]:
        """tenant -> capability -> model -> refusal, from the counters."""
        wanted: list[tuple[str, str, str, str, float, float, str]] = []
        for tenant in self._snapshot.tenants.values():
            for rule in tenant.limits:
                if rule.kind == "units":
                    key, until = units_key(tenant.id, rule, now)
                    wanted.append((key, tenant.id, rule.capability, rule.model or ALL, rule.limit,
                                   until, f"units per {rule.window_s} s"))
            if tenant.monthly_budget_usd:
                key, until = budget_key(tenant.id, now)
                wanted.append((key, tenant.id, ALL, ALL, tenant.monthly_budget_usd, until,
                               "monthly budget (USD)"))
        if not wanted:
            return {}
        try:
            values = self._counters().get_many([w[0] for w in wanted])
            if self._degraded:  # probe: back to the shared counters once they answer
                self.counters.get_many([wanted[0][0]])
                log.warning("shared counters reachable again")
                self._degraded = False
        except CountersUnavailable:
            if not self._degraded:
                log.error("shared counters unavailable: failing open to local counters")
            self._degraded = True
            values = self.fallback.get_many([w[0] for w in wanted])
        blocked: dict[str, dict[str, dict[str, dict]]] = {}
        for key, tenant, capability, model, limit, until, subject in wanted:
            used = values.get(key, 0.0)
            if used < limit:
                continue
            budget = subject.startswith("monthly")
            reason = "BUDGET_EXHAUSTED" if budget else "RATE_LIMITED"
            message = (f"tenant {tenant!r} spent its monthly budget of {limit:g} USD ({used:.6g} USD)"
                       if budget else
                       f"tenant {tenant!r} used {used:g} of its {limit:g} {subject}"
                       + ("" if capability == ALL else f" on {capability}"))
            blocked.setdefault(tenant, {}).setdefault(capability, {})[model] = {
                "reason": reason, "until": math.ceil(until), "message": message,
                "subject": subject, "limit": limit, "used": round(used, 6)}
        return blocked

    def admission(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        snapshot = self._snapshot
        blocked = self._read_blocked(now)
        tenants = {}
        for tenant in snapshot.tenants.values():
            requests: dict[str, dict[str, list[int]]] = {}
            for rule in tenant.limits:
                if rule.kind == "requests":
                    share = int(rule.limit // max(1, self.front_doors))
                    requests.setdefault(rule.capability, {})[rule.model or ALL] = [share, rule.window_s]
            tenants[tenant.id] = {
                "disabled": tenant.disabled,
                "capabilities": list(tenant.capabilities) or None,
                "models": list(tenant.models) or None,
                "requests": requests,
                "blocked": blocked.get(tenant.id, {}),
            }
        return {"enforce": self.enforce, "revoked": sorted(snapshot.revoked), "tenants": tenants}

    def refresh(self) -> bool:
        """Reloads the store, recomputes, publishes when anything changed."""
        snapshot = self.load()
        with self._lock:
            self._snapshot = snapshot
            state = self.admission()
            if state == self._published:
                return False
            self._version += 1
            self._published = state
        self.publish({"version": self._version, **state})
        return True

    async def run(self) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:  # a store or file hiccup must not end enforcement
                log.exception("quota refresh failed; keeping the last published state")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()

    def wake(self) -> None:
        """Publish soon (after a limit is crossed, or a tenant, limit or token change).
        Safe from any thread."""
        if self._wake is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)
