"""`aimesh serve tts`: TextToSpeechService on the Piper voice en_US-joe-medium (from PyPI)."""

from __future__ import annotations

from ..runtime.service import ServedModel
from ..runtime.settings import ServerSettings

DEFAULT_MODEL = ServedModel(id="piper-joe-medium", source="builtin:piper-voices")


def build(model: ServedModel, settings: ServerSettings):
    from .tts_engine import TtsEngine
    from .tts_servicer import TextToSpeechServicer

    return TextToSpeechServicer(
        model, TtsEngine(model.source, threads=settings.torch_threads), settings.pool
    )
