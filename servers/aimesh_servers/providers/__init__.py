"""Cloud-provider adapters: our contracts answered by a provider's HTTP API, so that a
model's fallback chain can end in a cloud provider (local -> second provider -> cloud).

`aimesh serve openai --model smollm2-135m --source <provider's model name>` serves the
logical model `smollm2-135m` through any OpenAI-compatible API (AIMESH_OPENAI_BASE_URL,
AIMESH_OPENAI_API_KEY).
"""

from __future__ import annotations

from ..runtime.service import ServedModel
from ..runtime.settings import ServerSettings

# `source` is the model name the provider knows.
DEFAULT_MODEL = ServedModel(id="gpt-4o-mini", source="gpt-4o-mini")
DEFAULT_POOL = "openai"


def build(model: ServedModel, settings: ServerSettings):
    from .openai_compat import OpenAICompatEngine, OpenAISettings
    from .servicer import ProviderTextServicer

    # The pool reported in served_by is "openai" unless --pool / AIMESH_POOL says otherwise.
    pool = settings.pool if "pool" in settings.model_fields_set else DEFAULT_POOL
    return ProviderTextServicer(model, OpenAICompatEngine(OpenAISettings()), pool)
