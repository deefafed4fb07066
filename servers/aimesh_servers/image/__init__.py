"""Image generation and image-to-image: ImageEngine (diffusers) and its
ImageGenerationService servicer."""

from __future__ import annotations

from dataclasses import replace

from ..models import builtin
from ..runtime.service import ServedModel
from ..runtime.settings import ServerSettings

# Offline default: a tiny random-weight Stable Diffusion (no diffusion weights ship on PyPI).
DEFAULT_MODEL = ServedModel(id="tiny-sd", source="builtin:tiny-sd", random_weights=True)


def build(model: ServedModel, settings: ServerSettings):
    from .engine import ImageEngine
    from .servicer import ImageGenerationServicer
    from .settings import ImageSettings

    if builtin.has_random_weights(model.source):  # also when named with --source
        model = replace(model, random_weights=True)
    batching = ImageSettings()
    engine = ImageEngine(model.source, threads=settings.torch_threads, max_batch=batching.max_batch,
                         batch_wait_s=batching.batch_wait_ms / 1000)
    return ImageGenerationServicer(model, engine, settings.pool)
