"""Every surface through the real Envoy front door: SDK (sync, async), grpcurl, HTTP/JSON."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

import aimesh
from aimesh.text.v1 import text_generation_pb2 as pb
from tests.conftest import VENV_BIN

QUESTION = [("user", "What is the capital of France? Answer in one sentence.")]
MODEL = "smollm2-135m"


def grpcurl(mesh, *positional: str, header: str | None = None,
            data: dict | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(VENV_BIN / "grpcurl"), "-plaintext"]
    if header:
        command += ["-H", header]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run([*command, mesh.front, *positional], capture_output=True, text=True, timeout=60)


def test_sync_sdk_streams_through_envoy(mesh):
    with aimesh.Client(mesh.front) as client:
        pieces = list(client.text.stream_generate(MODEL, QUESTION, max_tokens=24))
        whole = client.text.generate(MODEL, QUESTION, max_tokens=24)
    assert "Paris" in "".join(p.text_delta for p in pieces)
    assert pieces[-1].finish_reason == pb.FINISH_REASON_STOP
    assert whole.text == "".join(p.text_delta for p in pieces)
    assert whole.served_by.model == MODEL and whole.served_by.pool == "local"


async def test_async_sdk_streams_through_envoy(mesh):
    async with aimesh.AsyncClient(mesh.front) as client:
        pieces = [p async for p in client.text.stream_generate(MODEL, QUESTION, max_tokens=24)]
        with pytest.raises(aimesh.NotFoundError) as caught:
            await client.text.generate("no-such-model", QUESTION)
        with pytest.raises(aimesh.InvalidArgumentError) as bad:
            await client.text.generate(MODEL, QUESTION, max_tokens=0)
    assert "Paris" in "".join(p.text_delta for p in pieces)
    assert caught.value.reason == "MODEL_NOT_FOUND" and MODEL in caught.value.metadata["available"]
    assert bad.value.metadata["field"] == "max_tokens"


def test_grpcurl_lists_describes_and_calls_through_envoy(mesh):
    listed = grpcurl(mesh, "list")
    assert listed.returncode == 0, listed.stderr
    for service in ("aimesh.text.v1.TextGenerationService", "aimesh.registry.v1.ModelRegistryService",
                    "aimesh.speech.v1.TextToSpeechService", "aimesh.embedding.v1.EmbeddingService"):
        assert service in listed.stdout
    described = grpcurl(mesh, "describe", "aimesh.text.v1.TextGenerationService")
    assert "rpc StreamGenerate" in described.stdout and "/v1/models/{model}:streamGenerate" in described.stdout
    body = {"messages": [{"role": "ROLE_USER", "content": "What is the capital of France?"}], "max_tokens": 16}
    called = grpcurl(mesh, "aimesh.text.v1.TextGenerationService/StreamGenerate",
                     header=f"x-aimesh-model: {MODEL}", data=body)
    assert called.returncode == 0, called.stderr
    assert "Paris" in called.stdout and "FINISH_REASON_STOP" in called.stdout
    unknown = grpcurl(mesh, "aimesh.text.v1.TextGenerationService/Generate",
                      header="x-aimesh-model: nope", data=body)
    assert unknown.returncode != 0 and "NotFound" in unknown.stdout + unknown.stderr


def test_curl_http_json_unary_and_sse_stream(mesh):
    body = {"messages": [{"role": "ROLE_USER", "content": "What is the capital of France?"}], "max_tokens": 16}
    unary = subprocess.run(["curl", "-s", "-i", f"http://{mesh.front}/v1/models/{MODEL}:generate",
                            "-d", json.dumps(body)], capture_output=True, text=True, timeout=60)
    head, _, payload = unary.stdout.partition("\n\n")  # text mode turned CRLF into LF
    assert " 200 " in head.splitlines()[0] and "x-aimesh-served-model: smollm2-135m" in head
    answer = json.loads(payload)
    assert "Paris" in answer["text"] and answer["usage"]["completion_tokens"] > 0

    stream = subprocess.run(["curl", "-sN", f"http://{mesh.front}/v1/models/{MODEL}:streamGenerate",
                             "-d", json.dumps(body)], capture_output=True, text=True, timeout=60)
    events = [json.loads(line.removeprefix("data: ")) for line in stream.stdout.splitlines()
              if line.startswith("data: ")]
    assert len(events) > 3
    assert "Paris" in "".join(e["text_delta"] for e in events)
    assert events[-1]["finish_reason"] == "FINISH_REASON_STOP"


def test_http_json_errors_are_clear(mesh):
    base = f"http://{mesh.front}/v1/models"
    with httpx.Client(timeout=60) as http:
        unknown = http.post(f"{base}/nope:generate", json={"messages": [{"role": "ROLE_USER", "content": "x"}]})
        empty = http.post(f"{base}/{MODEL}:generate", json={"messages": []})
        wrong_type = http.post(f"{base}/{MODEL}:generate", json={"messages": [], "max_tokens": "many"})
        not_json = http.post(f"{base}/{MODEL}:generate", content=b"{not json")
        models = http.get(base)
    assert unknown.status_code == 404
    assert unknown.json()["details"][0]["reason"] == "MODEL_NOT_FOUND"
    assert empty.status_code == 400 and empty.json()["details"][0]["metadata"]["field"] == "messages"
    assert wrong_type.status_code == 400 and "max_tokens" in wrong_type.text
    assert not_json.status_code == 400
    assert MODEL in [m["id"] for m in models.json()["models"]]
    # The mesh still serves after bad input.
    ok = httpx.post(f"{base}/{MODEL}:generate", timeout=60,
                    json={"messages": [{"role": "ROLE_USER", "content": "Hi"}], "max_tokens": 3})
    assert ok.status_code == 200


def test_access_log_records_model_and_server(mesh):
    with aimesh.Client(mesh.front) as client:
        client.text.generate(MODEL, QUESTION, max_tokens=2)
    entries = [json.loads(line) for line in (mesh.state_dir / "access.log").read_text().splitlines()]
    mine = [e for e in entries if e["model"] == MODEL and e["served_model"] == MODEL]
    assert mine and mine[-1]["cluster"] == f"model_{MODEL}" and mine[-1]["grpc_status"] == "OK"
