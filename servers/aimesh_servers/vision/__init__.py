"""Image-to-text: VisionEngine (BLIP-style captions + tesseract OCR) and its
ImageToTextService servicer."""

from __future__ import annotations

from dataclasses import replace

from ..models import builtin
from ..runtime.batching import BatchSettings
from ..runtime.service import ServedModel
from ..runtime.settings import ServerSettings

# Captions from a tiny random-weight BLIP (noise, and labelled so), OCR from real tesseract.
DEFAULT_MODEL = ServedModel(id="tiny-blip-tesseract", source="builtin:tiny-blip", random_weights=True)


def build(model: ServedModel, settings: ServerSettings):
    """`model.source` names the captioning checkpoint; empty serves OCR only."""
    from .engine import VisionEngine
    from .servicer import ImageToTextServicer

    if builtin.has_random_weights(model.source):
        model = replace(model, random_weights=True)
    # Captioning's torch threads come from the batch settings (AIMESH_BATCH_TORCH_THREADS).
    engine = VisionEngine(model.source or None, ocr_threads=settings.torch_threads, batching=BatchSettings())
    return ImageToTextServicer(model, engine, settings.pool)
