"""Fixtures shared by every test depth."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Real Redis and PostgreSQL servers (session fixtures).
pytest_plugins = ["tests.infra"]

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
