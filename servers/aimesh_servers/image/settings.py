"""Settings of the image engine, read once from the environment (AIMESH_IMAGE_*)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ImageSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIMESH_IMAGE_", extra="ignore")

    max_batch: int = Field(
        4, ge=1, description="images per pipeline call (same-shape requests share one); "
                             "also the requests admitted at once")
    batch_wait_ms: float = Field(
        20.0, ge=0, description="how long a batch waits for same-shape requests to join")
