"""Starting real aimesh servers for tests: in-process (service tests) or as
subprocesses (mesh tests). Nothing here fakes our own code."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc

from aimesh_servers.runtime.runner import ModelServer
from aimesh_servers.runtime.service import Capability
from aimesh_servers.runtime.settings import ServerSettings


@contextlib.asynccontextmanager
async def in_process_server(
    capabilities: Sequence[Capability], **settings: object
) -> AsyncIterator[tuple[ModelServer, grpc.aio.Channel]]:
    """A real grpc.aio server on a free port with a loaded model, and a channel to it."""
    server = ModelServer(ServerSettings(port=0, drain_delay_s=0, drain_grace_s=1, **settings), capabilities)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield server, channel
    finally:
        await channel.close()
        await server.drain()


class ServerProcess:
    """`aimesh serve ...` as a subprocess; parses the port it prints. A thread reads its
    output into `lines`, so no wait here blocks past its timeout on a silent server."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, log: Path | None = None):
        self.args = list(args)
        self.log_path = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aimesh_servers.cli", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, bufsize=1,
        )
        self.lines: list[str] = []
        self._seen = 0  # lines wait_for has looked at: each wait starts after the last match
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.proc.poll() is not None and not self._reader.is_alive()
            while self._seen < len(self.lines):
                self._seen += 1
                if match := re.search(pattern, self.lines[self._seen - 1]):
                    return match
            if exited:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{''.join(self.lines)}")
            time.sleep(0.02)
        raise TimeoutError(f"no line matching {pattern!r} in {timeout}s:\n{''.join(self.lines)}")

    def wait_listening(self) -> int:
        self.port = int(self.wait_for(r"listening on [\d.]+:(\d+)").group(1))
        return self.port

    def wait_serving(self, timeout: float = 180.0) -> None:
        self.wait_for(r"serving .* on port", timeout)

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        self._reader.join(timeout)  # the rest of its output
        return self.proc.returncode


@contextlib.contextmanager
def server_process(*args: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    proc = ServerProcess(args, env=env)
    try:
        proc.wait_listening()
        yield proc
    finally:
        proc.stop()
