"""A real mesh for tests: `aimesh up` (control + Envoy + model servers) as a subprocess."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mesh:
    def __init__(self, state_dir: Path, registry: Path | None = None, only: list[str] | None = None,
                 extra_args: Sequence[str] = (), tenancy: bool = False):
        self.port, self.admin_port = free_port(), free_port()
        self.state_dir = state_dir
        args = [sys.executable, "-m", "aimesh_servers.cli", "up", "--port", str(self.port),
                "--admin-port", str(self.admin_port), "--state-dir", str(state_dir)]
        if registry:
            args += ["--registry", str(registry)]
        for kind in only or ():
            args += ["--only", kind]
        args += extra_args
        # Tests of routing, fallback and modalities run without tokens; tenancy tests
        # (and `aimesh up` itself, by default) run with them.
        if not tenancy:
            args.append("--no-tenancy")
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "mesh ready" in line:
                self._ready.set()

    @property
    def front(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        """The local tenant's token `aimesh up` made (tenancy on)."""
        return (self.state_dir / "local.token").read_text().strip()

    @property
    def admin_token(self) -> str:
        return (self.state_dir / "admin.token").read_text().strip()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"aimesh up did not get ready:\n{self.output}")

    def wait_line(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            time.sleep(0.1)
        raise TimeoutError(f"no line matching {pattern!r}:\n{self.output}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(60)


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """The default mesh (built-in registry, every capability), shared by mesh tests."""
    running = Mesh(tmp_path_factory.mktemp("mesh"))
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()
