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
    registry_capability: str  # registry.v1.Capability value name suffix

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


CAPABILITIES: dict[str, CapabilityInfo] = {
    info.name: info
    for info in (
        CapabilityInfo("text", "aimesh_servers.text", "TEXT_GENERATION"),
        CapabilityInfo("openai", "aimesh_servers.providers", "TEXT_GENERATION"),
        CapabilityInfo("vision", "aimesh_servers.vision", "IMAGE_TO_TEXT"),
        CapabilityInfo("embedding", "aimesh_servers.embedding", "EMBEDDING"),
        CapabilityInfo("image", "aimesh_servers.image", "IMAGE_GENERATION"),
        CapabilityInfo("stt", "aimesh_servers.speech.stt", "SPEECH_TO_TEXT"),
        CapabilityInfo("tts", "aimesh_servers.speech.tts", "TEXT_TO_SPEECH"),
    )
}
