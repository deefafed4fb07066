"""Settings of the local text engine, read once from the environment (AIMESH_TEXT_*)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TextSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIMESH_TEXT_", extra="ignore")

    max_batch: int = Field(
        32, ge=1, description="sequences decoded together: the engine's capacity in slots"
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="weights and compute (README, Text serving: why float32)"
    )
    prefill_chunk: int = Field(
        256, ge=16, description="prompt tokens per prefill pass, run between decode steps"
    )
    engine: Literal["transformers", "ctranslate2"] = Field(
        "transformers",
        description="transformers: continuous batching (dtype); ctranslate2: int8 micro-batches "
        "(README, Text serving: which and why)",
    )
    join_window_ms: float = Field(
        5.0, ge=0, description="ctranslate2: calls arriving this long after a batch's first join it"
    )
    batches_in_flight: int = Field(
        1, ge=1, description="ctranslate2: micro-batches generating at once (its inter_threads)"
    )
