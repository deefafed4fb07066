"""aimesh: a typed client for the aimesh AI model mesh.

    import aimesh
    with aimesh.Client("localhost:8080") as client:
        for piece in client.text.stream_generate("smollm2-135m", [("user", "Hi!")]):
            print(piece.text_delta, end="", flush=True)

Generated message types live under their proto packages, e.g. `aimesh.text.v1`.
"""

from __future__ import annotations

from .client import AsyncClient, Client
from .errors import (
    AimeshError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "AimeshError",
    "AsyncClient",
    "Client",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
]
__version__ = "0.1.0"
