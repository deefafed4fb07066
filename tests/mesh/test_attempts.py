"""At most 3 attempts per call, Envoy's and the SDK's together, in the worst case: every
pool of a chain answers busy (RESOURCE_EXHAUSTED with RetryInfo) or unavailable.

Two models, each a chain of two pools of `aimesh serve openai` (real adapters, real
Envoy) in front of a stand-in provider (the cloud cannot run here) that answers every
request 429 (busy) or 503 (unavailable) and counts the requests it gets: each attempt
that reaches a server is one provider request. Envoy's access log counts the same
attempts from its side. Run with -s for the figures.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import aimesh
import pytest

from tests.mesh.conftest import Mesh

MAX_ATTEMPTS_PER_CALL = 3
# Provider model name -> its answer: status, headers.
ANSWERS = {
    "busy": (429, {"retry-after-ms": "50"}),  # short enough that the SDK would retry
    "down": (503, {}),
}
REGISTRY = """
kind: aimesh/registry/v1
models:
""" + "".join(f"""
  - id: {model}
    capability: text_generation
    versions: [{{version: "1", source: "{model}"}}]
    pools:
      - {{id: primary, serve: openai, replicas: 1, source: "{model}",
         env: {{AIMESH_OPENAI_BASE_URL: "{{base}}/primary/v1", AIMESH_OPENAI_API_KEY: "sk-test"}}}}
      - {{id: secondary, serve: openai, replicas: 1, source: "{model}",
         env: {{AIMESH_OPENAI_BASE_URL: "{{base}}/secondary/v1", AIMESH_OPENAI_API_KEY: "sk-test"}}}}
""" for model in ANSWERS)


class Provider(BaseHTTPRequestHandler):
    """Refuses every chat completion as ANSWERS says, counting requests per (model, pool):
    each pool's adapter calls it under its own path."""

    requests: ClassVar[Counter[tuple[str, str]]] = Counter()
    lock = threading.Lock()

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        model = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["model"]
        with self.lock:
            self.requests[model, self.path.split("/")[1]] += 1
        status, headers = ANSWERS[model]
        body = json.dumps({"error": {"message": f"{model} stand-in", "type": "test"}}).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json",
                            "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    folder = tmp_path_factory.mktemp("attempts")
    provider = ThreadingHTTPServer(("127.0.0.1", 0), Provider)
    provider.daemon_threads = True
    threading.Thread(target=provider.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{provider.server_address[1]}"
    (folder / "registry.yaml").write_text(REGISTRY.replace("{base}", base))
    mesh = Mesh(folder / "state", registry=folder / "registry.yaml")
    try:
        mesh.wait_ready()
        # Until each chain routes: a call the server refuses as invalid (no provider request,
        # nothing Envoy retries or counts as a failure) answers from a server, not from Envoy.
        deadline = time.monotonic() + 60
        with aimesh.Client(mesh.front, max_attempts=1, timeout=30) as client:
            for model in ANSWERS:
                while True:
                    try:
                        client.text.generate(model, [("user", "Hi")], max_tokens=1, temperature=3)
                    except aimesh.UnavailableError:
                        assert time.monotonic() < deadline, f"{model} never routed"
                        time.sleep(0.2)
                    except aimesh.AimeshError as exc:
                        assert exc.code.name in ("INVALID_ARGUMENT", "OUT_OF_RANGE"), exc
                        break
        yield mesh
    finally:
        mesh.stop()
        provider.shutdown()


def envoy_attempts(access_log: Path, model: str, since_ms: int) -> tuple[int, list[dict]]:
    """Upstream attempts Envoy logged for calls naming `model` that started at `since_ms`
    (epoch ms) or later, and those log lines."""
    lines = [json.loads(line) for line in access_log.read_text().splitlines() if line.strip()]
    mine = [line for line in lines if line.get("model") == model and int(line["start_ms"]) >= since_ms]
    return sum(int(line["attempts"] or 0) for line in mine), mine


@pytest.mark.parametrize(("model", "error"), [("busy", aimesh.ResourceExhaustedError),
                                             ("down", aimesh.UnavailableError)])
def test_every_pool_refusing_costs_at_most_3_attempts(chains, model, error):
    since_ms = int(time.time() * 1000)
    # The SDK's defaults: busy retries on, 2 attempts of its own.
    with aimesh.Client(chains.front, timeout=30) as client, pytest.raises(error):
        client.text.generate(model, [("user", "Hi")], max_tokens=1)
    by_pool = {pool: n for (m, pool), n in Provider.requests.items() if m == model}  # warm-up: none
    reached = sum(by_pool.values())
    # Envoy writes its access log in batches: wait until it has logged what the servers saw.
    deadline = time.monotonic() + 30
    while (logged := envoy_attempts(chains.state_dir / "access.log", model, since_ms))[0] < reached:
        assert time.monotonic() < deadline, f"Envoy logged {logged[0]} attempts, servers saw {reached}"
        time.sleep(0.2)
    attempts, lines = logged
    print(f"{model}: {reached} attempts reached servers {by_pool}, Envoy logged {attempts} "
          f"in {len(lines)} call(s)")
    assert attempts == reached, lines
    assert reached <= MAX_ATTEMPTS_PER_CALL, lines
    # Fallback still happens: the call tried the next pool before giving up.
    assert set(by_pool) == {"primary", "secondary"}, by_pool
