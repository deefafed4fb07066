"""Text generation: TextEngine (transformers) and its TextGenerationService servicer."""

from __future__ import annotations

from ..runtime.service import ServedModel
from ..runtime.settings import ServerSettings

DEFAULT_MODEL = ServedModel(id="smollm2-135m", source="builtin:smollm2-135m-instruct")


def build(model: ServedModel, settings: ServerSettings):
    from .engine import TextEngine
    from .servicer import TextGenerationServicer
    from .settings import TextSettings

    engine = TextEngine(model.source, threads=settings.torch_threads, settings=TextSettings())
    return TextGenerationServicer(model, engine, settings.pool)
