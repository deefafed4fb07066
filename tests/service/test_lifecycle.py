"""A server whose model cannot load leaves: it deregisters, says why on one line and exits
non-zero (`aimesh serve` as a real subprocess, registering in a local folder)."""

from __future__ import annotations

from tests.servers import ServerProcess


def test_a_model_that_cannot_load_exits_non_zero_and_leaves_no_registration(tmp_path):
    registrations = tmp_path / "registrations"
    missing = tmp_path / "no-such-model"
    server = ServerProcess(["serve", "embedding", "--model", "broken", "--source", str(missing), "--port", "0"],
                           env={"AIMESH_REGISTRY_DIR": str(registrations)})
    try:
        server.wait_listening()
        failed = server.wait_for(r"\[aimesh-server\] failed to start broken: (.+)", timeout=180)
        code = server.proc.wait(timeout=60)
    finally:
        server.stop()
    assert code == 1, server.lines
    assert str(missing) in failed.group(1) and "\n" not in failed.group(1).strip()
    assert registrations.is_dir() and not list(registrations.glob("*.json")), list(registrations.iterdir())
