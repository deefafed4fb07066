"""The operator page in real headless Chromium, over a real mesh (`aimesh up`: Envoy and
an embedding model served by two pools): it shows the model and its pools in fallback
order, and marks a SIGKILLed server down."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from tests.mesh.conftest import Mesh

REGISTRY = """
kind: aimesh/registry/v1
models:
  - id: emb
    capability: embedding
    versions: [{version: "1", source: "builtin:all-minilm-l6-v2"}]
    pools:
      - {id: primary, serve: embedding, replicas: 1}
      - {id: secondary, serve: embedding, replicas: 1}
"""
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the chromium package (scripts/setup.sh)")


class PageView(HTMLParser):
    """What the rendered DOM shows: models, pools in order, endpoint states."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.models: list[str] = []
        self.pools: list[tuple[str, str, str]] = []  # (model, pool, priority)
        self.endpoints: dict[str, str] = {}  # address -> state
        self.text = dom
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if "data-model" in found:
            self.models.append(found["data-model"] or "")
        if "data-pool" in found:
            self.pools.append((self.models[-1], found["data-pool"] or "", found.get("data-priority") or ""))
        if "data-address" in found:
            self.endpoints[found["data-address"] or ""] = found.get("data-state") or ""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    folder = tmp_path_factory.mktemp("page")
    (folder / "registry.yaml").write_text(REGISTRY)
    running = Mesh(folder / "state", registry=folder / "registry.yaml", extra_args=["--ops-port", "0"])
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def chromium(profile: Path, *args: str) -> str:
    # A profile of its own: two Chromiums sharing one wait for each other's lock.
    done = subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         "--virtual-time-budget=3000", *args],
        check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_page_shows_pools_and_marks_a_killed_server_down(mesh: Mesh, tmp_path: Path):
    url = mesh.wait_line(r"page: +(http://127\.0\.0\.1:\d+/)").group(1)
    # Never behind the tenant front door.
    assert httpx.get(f"http://{mesh.front}/api/status", timeout=10).status_code != 200
    for i in range(5):
        httpx.post(f"http://{mesh.front}/v1/models/emb:embed", json={"texts": [f"call {i}"]},
                   timeout=30).raise_for_status()

    def look() -> PageView:
        return PageView(chromium(tmp_path / "profile", "--dump-dom", url))

    def ready(view: PageView) -> bool:  # both endpoints up, the registry's figures of the 5 calls shown
        return (len(view.endpoints) == 2 and all(state == "up" for state in view.endpoints.values())
                and "last 300s: 5 calls" in view.text)

    deadline = time.monotonic() + 90
    while not ready(view := look()):
        assert time.monotonic() < deadline, f"the page never showed both endpoints up and 5 calls: {view.text}"
    assert view.models == ["emb"]
    assert view.pools == [("emb", "primary", "0"), ("emb", "secondary", "1")]

    servers = json.loads((mesh.state_dir / "servers.json").read_text())
    primary = next(s for s in servers if s["pool"] == "primary")
    primary_address = next(
        f"{r['address']}:{r['port']}" for r in map(json.loads, (
            p.read_text() for p in (mesh.state_dir / "registrations").glob("*.json")))
        if r.get("pid") == primary["pid"])
    assert view.endpoints[primary_address] == "up"
    os.kill(primary["pid"], signal.SIGKILL)

    deadline = time.monotonic() + 90
    while (view := look()).endpoints.get(primary_address) != "down":
        assert time.monotonic() < deadline, f"the page never marked {primary_address} down: {view.endpoints}"
    assert view.pools == [("emb", "primary", "0"), ("emb", "secondary", "1")]

    screenshot = tmp_path / "page.png"
    chromium(tmp_path / "profile", "--window-size=1100,700", f"--screenshot={screenshot}", url)
    assert screenshot.read_bytes().startswith(b"\x89PNG")
