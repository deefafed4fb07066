"""The declarative model registry file: logical models, their versions, the pools
that serve each (in fallback order) and their prices. Checked against this schema
on load; an error names the offending key, e.g. `models[0].pools[1].serve`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_REGISTRY = Path(__file__).with_name("default.yaml")
ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class Capability(str, Enum):
    """Matches aimesh.registry.v1.Capability (CAPABILITY_<NAME>)."""

    TEXT_GENERATION = "text_generation"
    IMAGE_GENERATION = "image_generation"
    SPEECH_TO_TEXT = "speech_to_text"
    TEXT_TO_SPEECH = "text_to_speech"
    IMAGE_TO_TEXT = "image_to_text"
    EMBEDDING = "embedding"


# The gRPC services that implement each capability.
SERVICES: dict[Capability, tuple[str, ...]] = {
    Capability.TEXT_GENERATION: ("aimesh.text.v1.TextGenerationService",),
    Capability.IMAGE_GENERATION: ("aimesh.image.v1.ImageGenerationService",),
    Capability.SPEECH_TO_TEXT: ("aimesh.speech.v1.SpeechToTextService",),
    Capability.TEXT_TO_SPEECH: ("aimesh.speech.v1.TextToSpeechService",),
    Capability.IMAGE_TO_TEXT: ("aimesh.vision.v1.ImageToTextService",),
    Capability.EMBEDDING: ("aimesh.embedding.v1.EmbeddingService",),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Version(_Strict):
    version: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    source: str = Field(min_length=1, description="builtin:NAME, a local path or a hub id")
    deprecated: bool = False


class Pool(_Strict):
    """A group of servers (or a provider) that can serve the model."""

    id: str = Field(pattern=ID_PATTERN)
    serve: str = Field(description="server kind `aimesh serve` runs: text, openai, image, ...")
    replicas: int = Field(1, ge=0, le=16, description="servers `aimesh up` starts (0: started elsewhere)")
    source: str | None = Field(None, description="overrides the version's source (e.g. upstream model name)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for its servers")
    max_concurrency: int = Field(4, ge=1, le=1024)


# Answers the response cache may store (runtime/cache.py): a speech-to-text answer is not
# deterministic (Whisper falls back to sampling when a window decodes badly).
CACHEABLE = {Capability.TEXT_GENERATION, Capability.IMAGE_GENERATION, Capability.TEXT_TO_SPEECH,
             Capability.IMAGE_TO_TEXT, Capability.EMBEDDING}


class CachePolicy(_Strict):
    """Response cache of a model: its servers answer a repeated deterministic request from
    the cache (greedy or seeded text, seeded images, embeddings, speech, OCR/captions)."""

    enabled: bool = True
    ttl_s: float = Field(3600.0, gt=0, le=30 * 86400, description="how long an answer is served")
    scope: Literal["tenant", "shared"] = Field(
        "tenant", description="tenant: never served to another tenant; shared: to every tenant")

    def env(self) -> dict[str, str]:
        """The model server's settings (runtime/settings.py) for this policy."""
        return {"AIMESH_CACHE_ENABLED": "true" if self.enabled else "false",
                "AIMESH_CACHE_TTL_S": repr(self.ttl_s), "AIMESH_CACHE_SCOPE": self.scope}


class Model(_Strict):
    id: str = Field(pattern=ID_PATTERN)
    capability: Capability
    description: str = ""
    versions: list[Version] = Field(min_length=1)
    default_version: str | None = None
    pools: list[Pool] = Field(min_length=1, description="fallback chain: first is tried first")
    parameters: dict[str, str] = Field(default_factory=dict)
    prices: dict[str, float] = Field(default_factory=dict, description="USD per unit")
    random_weights: bool = False
    cache: CachePolicy | None = Field(None, description="response cache; unset: off")

    @field_validator("prices")
    @classmethod
    def _non_negative(cls, prices: dict[str, float]) -> dict[str, float]:
        for unit, price in prices.items():
            if price < 0:
                raise ValueError(f"price of {unit!r} is negative")
        return prices

    @model_validator(mode="after")
    def _consistent(self) -> Model:
        names = [v.version for v in self.versions]
        if len(set(names)) != len(names):
            raise ValueError("versions repeat")
        if self.default_version is not None and self.default_version not in names:
            raise ValueError(f"default_version {self.default_version!r} is not one of {names}")
        pool_ids = [p.id for p in self.pools]
        if len(set(pool_ids)) != len(pool_ids):
            raise ValueError("pool ids repeat")
        if self.cache is not None and self.cache.enabled and self.capability not in CACHEABLE:
            raise ValueError(f"cache: {self.capability.value} answers are not deterministic, "
                             "so they cannot be cached")
        return self

    @property
    def default(self) -> Version:
        wanted = self.default_version or self.versions[-1].version
        return next(v for v in self.versions if v.version == wanted)

    @property
    def services(self) -> tuple[str, ...]:
        return SERVICES[self.capability]

    @property
    def cluster(self) -> str:
        return f"model_{self.id}"


class Registry(_Strict):
    kind: Literal["aimesh/registry/v1"] = "aimesh/registry/v1"
    models: list[Model] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Registry:
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids repeat: {sorted(i for i in ids if ids.count(i) > 1)}")
        return self

    def get(self, model_id: str) -> Model | None:
        return next((m for m in self.models if m.id == model_id), None)

    def default_for(self, capability: Capability) -> Model | None:
        return next((m for m in self.models if m.capability == capability), None)


class RegistryError(ValueError):
    pass


def load_registry(path: str | Path | None = None) -> Registry:
    """Reads and checks a registry file; errors name the file and the offending key."""
    path = Path(path) if path else DEFAULT_REGISTRY
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryError(f"{path}: cannot read registry: {exc}") from exc
    try:
        return Registry.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
            lines.append(f"  {key or '(top)'}: {err['msg']}")
        raise RegistryError(f"{path}: invalid registry:\n" + "\n".join(lines)) from None
