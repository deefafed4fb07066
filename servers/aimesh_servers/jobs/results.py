"""Where item results live: a key/value interface whose keys are laid out like S3 object
keys (`<tenant>/<job-id>/<item>.pb`), with a folder on disk as the default store."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import quote


def result_key(tenant: str, job_id: str, index: int) -> str:
    # A tenant id is quoted so it is always one safe path segment.
    return f"{quote(tenant, safe='')}/{job_id}/{index}.pb"


def job_prefix(tenant: str, job_id: str) -> str:
    return f"{quote(tenant, safe='')}/{job_id}/"


class ResultStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete_prefix(self, prefix: str) -> None: ...


class FileResultStore:
    """Keys as files under `root`; a put is atomic (write, then rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()) or ".." in key.split("/"):
            raise ValueError(f"result key {key!r} leaves the store")
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix.rstrip("/")), ignore_errors=True)
