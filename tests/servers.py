"""Starting real aimesh servers for tests: in-process (service tests) or as
subprocesses (mesh tests). Nothing here fakes our own code."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
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
    """`aimesh serve ...` as a subprocess; parses the port it prints."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, log: Path | None = None):
        self.args = list(args)
        self.log_path = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aimesh_servers.cli", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, bufsize=1,
        )
        self.lines: list[str] = []
        self.port = 0

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited ({self.proc.returncode}):\n{''.join(self.lines)}")
                continue
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match
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
            rest, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        self.lines.append(rest or "")
        return self.proc.returncode


@contextlib.contextmanager
def server_process(*args: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    proc = ServerProcess(args, env=env)
    try:
        proc.wait_listening()
        yield proc
    finally:
        proc.stop()
