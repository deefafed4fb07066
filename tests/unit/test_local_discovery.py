"""Local registration folder: what servers write, what the controller sees."""

from __future__ import annotations

import subprocess
import sys

from aimesh_servers.registry.discovery import Instance, LocalDiscovery, LocalRegistrar

ME = Instance(id="chat-local-1", address="127.0.0.1", port=1, model="chat", pool="local",
              version="1", grpc_service="aimesh.text.v1.TextGenerationService")


def test_register_and_deregister_are_seen(tmp_path):
    registrar, discovery = LocalRegistrar(tmp_path), LocalDiscovery(tmp_path)
    registrar.register(ME)
    assert discovery.snapshot() == [ME]
    registrar.deregister(ME)
    assert discovery.snapshot() == []


def test_a_server_that_died_without_deregistering_is_dropped(tmp_path):
    # A real process registers, then dies without draining (as after SIGKILL).
    code = (
        "import os, sys; from aimesh_servers.registry.discovery import Instance, LocalRegistrar;"
        f"LocalRegistrar(sys.argv[1]).register(Instance(**{ME.__dict__!r}));"
        "os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    assert list(tmp_path.glob("*.json")), "the dead server's registration is on disk"
    assert LocalDiscovery(tmp_path).snapshot() == []
    assert not list(tmp_path.glob("*.json")), "and discovery reaped it"


def test_half_written_or_foreign_files_are_ignored(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"id": "x"}')
    LocalRegistrar(tmp_path).register(ME)
    assert LocalDiscovery(tmp_path).snapshot() == [ME]
