"""Service discovery: servers register themselves; the mesh controller watches.

Two backends with one interface: a local folder of registration files (the
embedded default, no extra process) and Consul's agent/health HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

SERVICE_NAME = "aimesh-model-server"


@dataclass(frozen=True, order=True)
class Instance:
    """One running model server, as registered."""

    id: str
    address: str
    port: int
    model: str
    pool: str
    version: str
    grpc_service: str  # health-checked service name

    @property
    def tags(self) -> list[str]:
        return [f"model={self.model}", f"pool={self.pool}", f"version={self.version}",
                f"grpc_service={self.grpc_service}"]

    @classmethod
    def from_tags(cls, id: str, address: str, port: int, tags: list[str]) -> Instance | None:
        fields = dict(t.split("=", 1) for t in tags if "=" in t)
        try:
            return cls(id=id, address=address, port=port, model=fields["model"], pool=fields["pool"],
                       version=fields.get("version", ""), grpc_service=fields.get("grpc_service", ""))
        except KeyError:
            return None


class Registrar(Protocol):
    def register(self, instance: Instance) -> None: ...
    def deregister(self, instance: Instance) -> None: ...


class Discovery(Protocol):
    def watch(self) -> AsyncIterator[list[Instance]]:
        """Yields the full set of registered instances each time it changes."""


class LocalRegistrar:
    """One JSON file per instance in a folder; written atomically (rename). It records the
    server's pid: a server killed without draining (SIGKILL, OOM) leaves its file behind,
    and discovery drops it once the process is gone, like Consul reaping a dead service."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def register(self, instance: Instance) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({**asdict(instance), "pid": os.getpid()}, f)
        os.replace(tmp, self.folder / f"{instance.id}.json")

    def deregister(self, instance: Instance) -> None:
        (self.folder / f"{instance.id}.json").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class LocalDiscovery:
    """Polls the registration folder (cheap: a directory listing every `interval_s`)."""

    def __init__(self, folder: Path, interval_s: float = 0.25) -> None:
        self.folder = Path(folder)
        self.interval_s = interval_s

    def snapshot(self) -> list[Instance]:
        instances = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                fields = json.loads(path.read_text())
                pid = fields.pop("pid", None)
                instance = Instance(**fields)
            except (OSError, ValueError, TypeError):
                continue  # removed or half-visible between listing and reading
            if pid is not None and not _alive(pid):
                path.unlink(missing_ok=True)
                continue
            instances.append(instance)
        return instances

    async def watch(self) -> AsyncIterator[list[Instance]]:
        last: list[Instance] | None = None
        while True:
            current = self.snapshot()
            if current != last:
                last = current
                yield current
            await asyncio.sleep(self.interval_s)
