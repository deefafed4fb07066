"""Plans as code: each names default limits per capability and a monthly budget.

A tenant's effective limits are its plan's, with every override replacing the plan
limit of the same (capability, model, kind); an override may also add a limit the plan
lacks (a per-model one, say). Overrides live in the `tenant_limits` table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Capability short names (as in token scopes) -> full gRPC service name.
SERVICES: dict[str, str] = {
    "text": "aimesh.text.v1.TextGenerationService",
    "image": "aimesh.image.v1.ImageGenerationService",
    "stt": "aimesh.speech.v1.SpeechToTextService",
    "tts": "aimesh.speech.v1.TextToSpeechService",
    "vision": "aimesh.vision.v1.ImageToTextService",
    "embedding": "aimesh.embedding.v1.EmbeddingService",
}
# What a "units" limit counts, per capability (text: prompt + completion tokens).
UNITS: dict[str, str] = {
    "text": "tokens",
    "image": "image_steps",
    "stt": "audio_seconds",
    "tts": "characters",
    "vision": "images",
    "embedding": "items",
}
ALL_CAPABILITIES = "*"
ADMIN_SCOPE = "admin"
KINDS = ("requests", "units")
MINUTE, HOUR, DAY = 60, 3600, 86400


@dataclass(frozen=True)
class Limit:
    """At most `limit` calls ("requests") or units ("units") per fixed window of
    `window_s` seconds, for one capability ("*" = all together) and model ("" = all)."""

    capability: str
    kind: str
    limit: float
    window_s: int
    model: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return self.capability, self.model, self.kind


@dataclass(frozen=True)
class Plan:
    name: str
    limits: tuple[Limit, ...]
    monthly_budget_usd: float = 0.0  # 0 = no budget
    description: str = ""


def _per_capability(requests_per_min: float, units_per_min: dict[str, float]) -> tuple[Limit, ...]:
    limits = [Limit(c, "requests", requests_per_min, MINUTE) for c in SERVICES]
    limits += [Limit(c, "units", units_per_min[c], MINUTE) for c in SERVICES]
    return tuple(limits)


PLANS: dict[str, Plan] = {
    plan.name: plan
    for plan in (
        Plan(
            "default",
            _per_capability(600, {"text": 200_000, "image": 2_000, "stt": 3_600, "tts": 100_000,
                                  "vision": 600, "embedding": 50_000}),
            monthly_budget_usd=0.0,
            description="generous: a local mesh just works",
        ),
        Plan(
            "free",
            _per_capability(20, {"text": 10_000, "image": 100, "stt": 300, "tts": 5_000,
                                 "vision": 20, "embedding": 2_000})
            + (Limit(ALL_CAPABILITIES, "requests", 2_000, DAY),),
            monthly_budget_usd=5.0,
            description="small: trials",
        ),
        Plan("unlimited", (), monthly_budget_usd=0.0, description="no limits, no budget"),
    )
}
DEFAULT_PLAN = "default"


def get_plan(name: str) -> Plan:
    """The plan of that name; KeyError names the known ones."""
    try:
        return PLANS[name]
    except KeyError:
        raise KeyError(f"unknown plan {name!r}; plans: {', '.join(sorted(PLANS))}") from None


def effective_limits(plan: Plan, overrides: Iterable[Limit]) -> list[Limit]:
    """The plan's limits with each override replacing the one of the same key, sorted."""
    merged = {limit.key: limit for limit in plan.limits}
    merged.update({limit.key: limit for limit in overrides})
    return sorted(merged.values(), key=lambda limit: (limit.key, limit.window_s))


def effective_budget(plan: Plan, tenant_budget_usd: float | None) -> float:
    """The tenant's own monthly budget if set, else the plan's (0 = none)."""
    return plan.monthly_budget_usd if tenant_budget_usd is None else tenant_budget_usd
