"""Real Redis and PostgreSQL servers for tests, started once per session.

`redis_url` and `postgres_url` are session fixtures (registered in tests/conftest.py):
the first test that asks starts the server, the end of the session stops it. Tests
that need a clean slate use `fresh_postgres_url` (a new database on the shared server)
or flush their own Redis keys. Both servers are the Debian binaries (apt
redis-server, postgresql); a test is skipped when they are not installed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, what: str, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S) -> None:
    """Polls check() until it is true; fails with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{log.read_text(errors='replace')}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready in {timeout}s:\n{log.read_text(errors='replace')}")


def with_parent_death_signal(signal_name: str, command: list[str]) -> list[str]:
    """`command` run so that it gets `signal_name` when the test process dies, even by
    SIGKILL (util-linux setpriv), so a killed test run leaves no server behind."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", signal_name, "--", *command] if setpriv else command


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A real redis-server on a free port, without persistence; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    import redis

    workdir = Path(tempfile.mkdtemp(prefix="aimesh-redis-"))
    log = workdir / "redis.log"
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            with_parent_death_signal("TERM", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                              "--appendonly", "no", "--dir", str(workdir)]),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        wait_until(client.ping, "redis-server", proc, log)
        client.close()
        yield url
    finally:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def postgres_bin() -> Path | None:
    """The newest PostgreSQL's binaries (Debian keeps them under /usr/lib/postgresql/<ver>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """A throwaway PostgreSQL cluster in a temp dir, on 127.0.0.1 at a free port.

    As root, initdb and postgres refuse to run, so they run as the `postgres` system
    user (runuser) in a temp dir made theirs.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.workdir = Path(tempfile.mkdtemp(prefix="aimesh-pg-"))
        self.data = self.workdir / "data"
        self.log = self.workdir / "postgres.log"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.workdir, owner.pw_uid, owner.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.user = "postgres" if self.as_user else pwd.getpwuid(os.geteuid()).pw_name
        self.proc: subprocess.Popen | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        subprocess.run(
            [*self.as_user, str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user,
             "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
            check=True, capture_output=True, timeout=START_TIMEOUT_S,
        )
        with self.log.open("wb") as out:
            if self.as_user:
                os.chown(self.log, pwd.getpwnam("postgres").pw_uid, -1)
            # SIGINT is PostgreSQL's fast shutdown: it does not wait for clients to leave.
            postgres = with_parent_death_signal("INT", [
                str(self.bindir / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
                "-k", str(self.workdir), "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off", "-c", "max_connections=200"])
            self.proc = subprocess.Popen(
                with_parent_death_signal("TERM", [*self.as_user, *postgres]) if self.as_user else postgres,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_until(self._accepts, "postgres", self.proc, self.log)

    def _accepts(self) -> bool:
        import psycopg

        with psycopg.connect(self.url().replace("+psycopg", ""), connect_timeout=2):
            return True

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run(
                [*self.as_user, str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast",
                 "-t", str(int(STOP_TIMEOUT_S))],
                capture_output=True, timeout=STOP_TIMEOUT_S + 5, check=False,
            )
            stop(self.proc)
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """A database on the session's PostgreSQL, shared by every test that asks."""
    return postgres_server.create_database("aimesh")


@pytest.fixture
def fresh_postgres_url(postgres_server: PostgresServer) -> str:
    """An empty database of its own on the session's PostgreSQL."""
    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
