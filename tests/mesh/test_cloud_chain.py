"""A chain that ends in a cloud provider: local server -> OpenAI-compatible adapter.

`aimesh up` starts both pools itself; the "cloud" is a real OpenAI-compatible server
running here (`transformers serve` with the SmolLM2 weights), reached through
`aimesh serve openai`. When the local server dies, calls fail over to the provider."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

import aimesh
from aimesh_servers.models import builtin
from tests.mesh.conftest import Mesh
from tests.service.test_openai_adapter import transformers_serve

HI = [("user", "Say hello.")]


@pytest.fixture(scope="module")
def cloud_chain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cloud-chain")
    weights = builtin.resolve("builtin:smollm2-135m-instruct")
    with transformers_serve(weights, folder / "provider.log") as base_url:
        (folder / "registry.yaml").write_text(f"""
kind: aimesh/registry/v1
models:
  - id: chat
    capability: text_generation
    versions: [{{version: "1", source: "builtin:smollm2-135m-instruct"}}]
    pools:
      - {{id: local, serve: text, replicas: 1}}
      - id: cloud
        serve: openai
        replicas: 1
        source: "{weights}"
        env: {{AIMESH_OPENAI_BASE_URL: "{base_url}", AIMESH_OPENAI_API_KEY: "sk-local-test"}}
""")
        mesh = Mesh(folder / "state", registry=folder / "registry.yaml")
        try:
            mesh.wait_ready()
            yield mesh
        finally:
            mesh.stop()


def test_local_first_then_the_cloud_provider_when_local_dies(cloud_chain):
    with aimesh.Client(cloud_chain.front, max_attempts=1, timeout=60) as client:
        first = client.text.generate("chat", HI, max_tokens=4)
        assert first.served_by.pool == "local"
        servers = json.loads((cloud_chain.state_dir / "servers.json").read_text())
        local = next(s for s in servers if s["pool"] == "local")
        os.kill(local["pid"], signal.SIGKILL)
        pools = []
        for _ in range(6):
            answer = client.text.generate("chat", HI, max_tokens=4)  # none may fail
            pools.append(answer.served_by.pool)
            time.sleep(0.3)
        streamed = list(client.text.stream_generate("chat", HI, max_tokens=4))
    assert set(pools) == {"cloud"}
    assert answer.text and answer.usage.completion_tokens > 0
    assert streamed[-1].served_by.pool == "cloud" and streamed[-1].usage.completion_tokens > 0
    registry = aimesh.Client(cloud_chain.front).registry.get_model("chat")
    assert [p.id for p in registry.pools] == ["local", "cloud"]
