"""Image generation and image-to-image: ImageEngine (diffusers) and its
ImageGenerationService servicer."""

from __future__ import annotations

from ..runtime.service import ServedModel
from ..runtime.settings import ServerSettings

# Offline default: a tiny random-weight Stable Diffusion (no diffusion weights ship on PyPI).
DEFAULT_MODEL = ServedModel(id="tiny-sd", source="builtin:tiny-sd", random_weights=True)


def build(model: ServedModel, settings: ServerSettings):
    from .engine import ImageEngine
    from .servicer import ImageGenerationServicer

    return ImageGenerationServicer(model, ImageEngine(model.source, threads=settings.torch_threads), settings.pool)
