"""Job settings, read once at start (environment; `aimesh up` flags override some)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class JobSettings:
    # A batch keeps at most max(1, share * slots) items of a model in flight (slots: the
    # model's first pool, max_concurrency x replicas), so interactive calls keep the rest.
    batch_share: float = 0.5
    # A worker holds an item this long, renewed every third of it while the call runs; a
    # dead worker's items go to another when it ends (Redis: its pending messages too).
    lease_s: float = 15.0
    retention_s: float = 7 * 86400.0  # results are deleted this long after a job ends
    max_items: int = 1000  # requests in one job
    # Calls per item while the mesh answers UNAVAILABLE / RESOURCE_EXHAUSTED (backoff 1, 2,
    # 4... s, at most 30 s: about 2.5 minutes in all, e.g. while a model server restarts).
    max_attempts: int = 10
    item_timeout_s: float = 600.0  # deadline of one item's call
    in_process_workers: bool = True  # False: `aimesh worker` processes take the items (Redis)

    @classmethod
    def from_env(cls, **overrides: object) -> JobSettings:
        env = os.environ
        settings = cls(
            batch_share=float(env.get("AIMESH_JOB_BATCH_SHARE", cls.batch_share)),
            lease_s=float(env.get("AIMESH_JOB_LEASE_S", cls.lease_s)),
            retention_s=float(env.get("AIMESH_JOB_RETENTION_S", cls.retention_s)),
            max_items=int(env.get("AIMESH_JOB_MAX_ITEMS", cls.max_items)),
            max_attempts=int(env.get("AIMESH_JOB_MAX_ATTEMPTS", cls.max_attempts)),
            item_timeout_s=float(env.get("AIMESH_JOB_ITEM_TIMEOUT_S", cls.item_timeout_s)),
        )
        if not 0 < settings.batch_share <= 1:
            raise ValueError(f"AIMESH_JOB_BATCH_SHARE={settings.batch_share}: give a share in (0, 1]")
        return replace(settings, **overrides)  # type: ignore[arg-type]
