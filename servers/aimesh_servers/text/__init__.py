"""Text generation: TextEngine (transformers) or CT2TextEngine (CTranslate2), and the
TextGenerationService servicer."""

from __future__ import annotations

from ..runtime.service import ServedModel
from ..runtime.settings import ServerSettings

DEFAULT_MODEL = ServedModel(id="smollm2-135m", source="builtin:smollm2-135m-instruct")


def build(model: ServedModel, settings: ServerSettings):
    from .servicer import TextGenerationServicer
    from .settings import TextSettings

    text_settings = TextSettings()
    if text_settings.engine == "ctranslate2":
        from .ct2_engine import CT2TextEngine as engine_class
    else:
        from .engine import TextEngine as engine_class
    engine = engine_class(model.source, threads=settings.torch_threads, settings=text_settings)
    return TextGenerationServicer(model, engine, settings.pool)
