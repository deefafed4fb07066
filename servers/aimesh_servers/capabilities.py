"""The capabilities a model server can host, by the name `aimesh serve` takes.

Each entry names a module with `DEFAULT_MODEL` (the offline default) and
`build(model, settings)` returning the servicer; modules load lazily, so the CLI
starts without importing torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class CapabilityInfo:
    name: str  # as on the command line: aimesh serve <name>
    module: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


CAPABILITIES: dict[str, CapabilityInfo] = {
    info.name: info
    for info in (
        CapabilityInfo("text", "aimesh_servers.text"),
        CapabilityInfo("openai", "aimesh_servers.providers"),
        CapabilityInfo("vision", "aimesh_servers.vision"),
        CapabilityInfo("embedding", "aimesh_servers.embedding"),
        CapabilityInfo("image", "aimesh_servers.image"),
        CapabilityInfo("stt", "aimesh_servers.speech.stt"),
        CapabilityInfo("tts", "aimesh_servers.speech.tts"),
    )
}
