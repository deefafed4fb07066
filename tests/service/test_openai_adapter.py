"""The OpenAI-compatible provider adapter over a real in-process grpc.aio server.

Two real upstreams: `transformers serve` running the real SmolLM2 (a genuine
OpenAI-compatible server) for what a provider answers when things go well, and a small
real HTTP server on 127.0.0.1 standing in for a cloud provider's refusals (429, 401,
5xx...), broken streams and stalls, which no local server produces on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import pytest

import aimesh
from aimesh.text.v1 import text_generation_pb2 as pb
from aimesh.text.v1 import text_generation_pb2_grpc as pb_grpc
from aimesh_servers import providers
from aimesh_servers.models import builtin
from aimesh_servers.runtime.service import ServedModel
from aimesh_servers.runtime.settings import ServerSettings
from tests.conftest import VENV_BIN
from tests.servers import in_process_server, server_process

QUESTION = [("user", "What is the capital of France? Answer in one sentence.")]
KEY = "sk-test-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smollm2_folder() -> str:
    return builtin.resolve("builtin:smollm2-135m-instruct")


@contextlib.contextmanager
def transformers_serve(folder: str, log: Path, threads: int = 1) -> Iterator[str]:
    """`transformers serve FOLDER` (a real OpenAI-compatible server); yields its API root.

    One torch thread by default: on 2 shared cores, two spinning threads ran 3x slower
    under load."""
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "transformers"), "serve", folder,
             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not start:\n{log.read_text()}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def upstream(smollm2_folder, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("upstream") / "transformers-serve.log"
    with transformers_serve(smollm2_folder, log) as base:
        yield base


def adapter(model: ServedModel, base_url: str, key: str | None = None):
    """The adapter as `aimesh serve openai` builds it: settings from AIMESH_OPENAI_*."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIMESH_OPENAI_BASE_URL", base_url)
        if key:
            env.setenv("AIMESH_OPENAI_API_KEY", key)
        else:
            env.delenv("AIMESH_OPENAI_API_KEY", raising=False)
        return providers.build(model, ServerSettings())


@pytest.fixture(scope="module")
async def real(upstream, smollm2_folder):
    servicer = adapter(ServedModel(id="smollm2-135m", source=smollm2_folder), upstream)
    async with in_process_server([servicer], max_concurrency=2) as (server, _):
        client = aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1)
        yield server, client
        await client.close()
        await servicer.engine.aclose()


# ---- the real upstream ---------------------------------------------------------------

async def test_stream_generate_streams_the_providers_tokens_with_its_usage(real):
    _, client = real
    pieces = [p async for p in client.text.stream_generate("smollm2-135m", QUESTION, max_tokens=24)]
    assert len(pieces) > 3, "tokens arrive as separate messages"
    assert "Paris" in "".join(p.text_delta for p in pieces)
    last = pieces[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert last.usage.prompt_tokens > 10 and last.usage.completion_tokens > 3
    assert pieces[0].served_by.model == "smollm2-135m" and pieces[0].served_by.pool == "openai"
    assert last.served_by.pool == "openai" and not last.served_by.random_weights


async def test_generate_matches_stream_and_maps_length(real):
    _, client = real
    whole = await client.text.generate("smollm2-135m", QUESTION, max_tokens=24)
    streamed = "".join([p.text_delta async for p in
                        client.text.stream_generate("smollm2-135m", QUESTION, max_tokens=24)])
    assert whole.text == streamed and "Paris" in whole.text  # greedy: temperature 0 is sent
    assert whole.served_by.pool == "openai"
    short = await client.text.generate("smollm2-135m", QUESTION, max_tokens=3)
    assert short.finish_reason == pb.FINISH_REASON_LENGTH
    assert short.usage.completion_tokens == 3


async def test_stop_sequence_is_cut_even_when_the_provider_includes_it(real):
    # transformers serve stops at "5" but returns it; the contract says it is left out.
    _, client = real
    count = [("user", "Count from 1 to 10, one number per line.")]
    out = await client.text.generate("smollm2-135m", count, max_tokens=60, stop=["5"])
    assert out.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert "4" in out.text and "5" not in out.text
    assert out.usage.completion_tokens > 0


async def test_seed_and_sampling_settings_reach_the_provider(real):
    _, client = real
    kwargs = dict(max_tokens=12, temperature=1.2, top_p=0.95, seed=7)
    first = await client.text.generate("smollm2-135m", [("user", "Tell me a word.")], **kwargs)
    second = await client.text.generate("smollm2-135m", [("user", "Tell me a word.")], **kwargs)
    assert first.text == second.text


async def test_unknown_model_is_ours_to_refuse(real):
    _, client = real
    with pytest.raises(aimesh.NotFoundError) as caught:
        await client.text.generate("gpt-17", QUESTION)
    assert caught.value.reason == "MODEL_NOT_FOUND"
    assert caught.value.metadata["available"] == "smollm2-135m"


def test_aimesh_serve_openai_reads_its_settings_from_the_environment(upstream, smollm2_folder):
    env = {"AIMESH_OPENAI_BASE_URL": upstream, "AIMESH_OPENAI_API_KEY": KEY}
    with server_process("serve", "openai", "--model", "smollm2-135m", "--source", smollm2_folder,
                        env=env) as proc:
        proc.wait_serving(timeout=60)
        with aimesh.Client(f"127.0.0.1:{proc.port}", max_attempts=1) as client:
            out = client.text.generate("smollm2-135m", [("user", "Say hi.")], max_tokens=4)
        assert out.text and out.served_by.pool == "openai" and out.usage.completion_tokens == 4
    assert not any(KEY in line for line in proc.lines), "the API key reached the log"


# ---- a stand-in provider for what a real one does when it refuses or breaks ----------

def chunk(content: str | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    delta = {"content": content} if content is not None else {"role": "assistant"}
    event: dict = {"object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:  # OpenAI's way: a last chunk with no choices and the usage
        event = {"object": "chat.completion.chunk", "choices": [], "usage": usage}
    return event


# What the stand-in answers to these prompts: HTTP status, extra headers, provider's message.
REFUSALS = {
    "rate limited": (429, {"Retry-After": "7"}, "Rate limit reached"),
    "bad key": (401, {}, "Incorrect API key provided: {key}"),  # echoes the key, as some do
    "forbidden": (403, {}, "Project lacks access"),
    "no such model": (404, {}, "The model does not exist"),
    "too long": (400, {}, "maximum context length is 8192 tokens"),
    "overloaded": (503, {}, "The server is overloaded"),
}


class _Provider(BaseHTTPRequestHandler):
    """Answers by the last message's content, like a provider in that situation would."""

    server: StandIn

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, self.headers.get("Authorization"), body))
        what = body["messages"][-1]["content"]
        if what in REFUSALS:
            status, headers, message = REFUSALS[what]
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            raw = json.dumps({"error": {"message": message.format(key=key)}}).encode()
            self.send_response(status)
            for name, value in {**headers, "Content-Type": "application/json",
                                "Content-Length": str(len(raw))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(raw)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        events = {
            "no usage": [chunk(), chunk("Hi there"), chunk(finish="stop"), "[DONE]"],
            "cut": [chunk(), chunk("Partial answer")],  # then the connection just closes
            "stall": [chunk(), chunk("Hel")],  # then only keep-alive comments
            "ignore stop": [chunk()] + [chunk(f"{i}\n") for i in range(1, 200)],
        }.get(what, [chunk(), chunk("Hello"), chunk(" world"), chunk(finish="stop"),
                     chunk(usage={"prompt_tokens": 5, "completion_tokens": 2}), "[DONE]"])
        try:
            for event in events:
                self.send_event(event)
                time.sleep(0.01)
            while what == "stall":
                self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnects.put(what)

    def send_event(self, event: dict | str) -> None:
        data = event if isinstance(event, str) else json.dumps(event)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()


class StandIn(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Provider)
        self.requests: list[tuple[str, str | None, dict]] = []
        self.disconnects: queue.Queue[str] = queue.Queue()

    async def disconnected(self, timeout: float = 10.0) -> str:
        return await asyncio.to_thread(self.disconnects.get, timeout=timeout)


@pytest.fixture(scope="module")
async def provider():
    standin = StandIn()
    threading.Thread(target=standin.serve_forever, daemon=True).start()
    servicer = adapter(ServedModel(id="gpt-test", source="gpt-upstream"),
                       f"http://127.0.0.1:{standin.server_address[1]}/v1", key=KEY)
    async with in_process_server([servicer], max_concurrency=2) as (server, _):
        client = aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1)
        yield standin, server, client
        await client.close()
        await servicer.engine.aclose()
    standin.shutdown()
    standin.server_close()


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def assert_still_serving(server, client) -> None:
    ok = await client.text.generate("gpt-test", [("user", "hello")], max_tokens=8)
    assert ok.text == "Hello world"
    await until(lambda: server.limit.in_flight == 0)
    assert server.limit.in_flight == 0, "a concurrency slot leaked"


async def test_request_sent_to_the_provider(provider):
    standin, server, client = provider
    out = await client.text.generate("gpt-test", [("system", "Be brief."), ("user", "hello")],
                                     max_tokens=8, temperature=0.5, top_p=0.9, stop=["xyz"], seed=3)
    path, auth, body = standin.requests[-1]
    assert path == "/v1/chat/completions" and auth == f"Bearer {KEY}"
    assert body["model"] == "gpt-upstream"
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hello"}]
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (8, 0.5, pytest.approx(0.9))
    assert body["stop"] == ["xyz"] and body["seed"] == 3
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    # Usage in a separate last chunk (OpenAI's way), [DONE] at the end.
    assert out.text == "Hello world" and out.finish_reason == pb.FINISH_REASON_STOP
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (5, 2)
    assert out.served_by.model == "gpt-test" and out.served_by.pool == "openai"


@pytest.mark.parametrize(
    ("prompt", "code", "reason"),
    [
        ("rate limited", grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_BUSY"),
        ("bad key", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_FAILURE"),
        ("forbidden", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_FAILURE"),
        ("no such model", grpc.StatusCode.NOT_FOUND, "UPSTREAM_FAILURE"),
        ("too long", grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_FAILURE"),
        ("overloaded", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_FAILURE"),
    ],
)
async def test_provider_refusals_map_to_our_statuses(provider, caplog, prompt, code, reason):
    standin, server, client = provider
    caplog.set_level(logging.DEBUG)
    for call in ("generate", "stream_generate"):
        with pytest.raises(aimesh.AimeshError) as caught:
            if call == "generate":
                await client.text.generate("gpt-test", [("user", prompt)])
            else:
                _ = [p async for p in client.text.stream_generate("gpt-test", [("user", prompt)])]
        assert caught.value.code == code and caught.value.reason == reason
        assert caught.value.domain == "aimesh.dev"
        assert caught.value.metadata["upstream_status"] == str(REFUSALS[prompt][0])
        assert KEY not in caught.value.message, "the provider's echo of our key was passed on"
    if prompt == "rate limited":
        assert caught.value.retry_after_s == 7
    if prompt in ("bad key", "forbidden"):
        assert "adapter's API key" in caught.value.message
    if prompt == "bad key":
        assert "Incorrect API key provided: ***" in caught.value.message
    if prompt == "too long":
        assert "maximum context length" in caught.value.message
    assert KEY not in caplog.text, "the API key reached the log"
    await assert_still_serving(server, client)


async def test_a_refused_stream_sends_no_headers_so_the_mesh_can_fall_back(provider):
    # A trailers-only error is one Envoy may retry on the next pool of the chain.
    _, server, _ = provider
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.TextGenerationServiceStub(channel)
        call = stub.StreamGenerate(pb.StreamGenerateRequest(
            model="gpt-test", messages=[pb.ChatMessage(role=pb.ROLE_USER, content="overloaded")]),
            timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not [k for k, _ in (await call.initial_metadata() or ()) if k.startswith("x-aimesh")]
        good = stub.StreamGenerate(pb.StreamGenerateRequest(
            model="gpt-test", messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hello")]),
            timeout=10)
        assert [m async for m in good][0].text_delta == "Hello"
        assert dict(await good.initial_metadata())["x-aimesh-pool"] == "openai"


async def test_the_key_can_come_from_a_variable_the_pool_names(provider):
    # Two provider pools (say Groq, then OpenAI) each name their own key variable.
    standin = provider[0]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STANDIN_PROVIDER_KEY", "gsk-another-key")
        env.setenv("AIMESH_OPENAI_API_KEY_ENV", "STANDIN_PROVIDER_KEY")
        servicer = adapter(ServedModel(id="gpt-test", source="gpt-upstream"),
                           f"http://127.0.0.1:{standin.server_address[1]}/v1")
    async with in_process_server([servicer]) as (server, _):
        async with aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
            out = await client.text.generate("gpt-test", [("user", "hello")])
    await servicer.engine.aclose()
    assert out.text == "Hello world"
    assert standin.requests[-1][1] == "Bearer gsk-another-key"


async def test_unreachable_provider_is_unavailable():
    servicer = adapter(ServedModel(id="gpt-test", source="gpt-upstream"),
                       f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there
    async with in_process_server([servicer]) as (server, _):
        async with aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
            with pytest.raises(aimesh.UnavailableError) as caught:
                await client.text.generate("gpt-test", QUESTION)
        assert caught.value.reason == "UPSTREAM_FAILURE" and "cannot reach" in caught.value.message
        assert server.limit.in_flight == 0
    await servicer.engine.aclose()


async def test_cancelling_a_stream_closes_the_providers_connection(provider):
    standin, server, client = provider
    stream = client.text.stream_generate("gpt-test", [("user", "stall")], max_tokens=100)
    first = await anext(stream)
    assert first.text_delta == "Hel"
    await stream.aclose()  # cancels the RPC
    assert await standin.disconnected() == "stall"
    await assert_still_serving(server, client)


async def test_the_deadline_bounds_the_provider_call(provider):
    standin, server, client = provider
    with pytest.raises(aimesh.DeadlineExceededError):
        await client.text.generate("gpt-test", [("user", "stall")], timeout=1.0)
    # The stand-in stalls forever: only our side closing the connection ends its answer.
    assert await standin.disconnected() == "stall"
    await assert_still_serving(server, client)


async def test_a_provider_that_ignores_stop_is_cut_off(provider):
    standin, server, client = provider
    out = await client.text.generate("gpt-test", [("user", "ignore stop")], stop=["4\n"])
    assert out.text == "1\n2\n3\n" and out.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert await standin.disconnected() == "ignore stop"  # we stopped reading and closed
    assert out.usage.completion_tokens == 0  # the provider never said; we do not guess
    await assert_still_serving(server, client)


async def test_missing_usage_is_reported_as_zero(provider):
    _, server, client = provider
    out = await client.text.generate("gpt-test", [("user", "no usage")])
    assert out.text == "Hi there" and out.finish_reason == pb.FINISH_REASON_STOP
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (0, 0)


async def test_a_stream_cut_midway_is_interrupted_not_finished(provider):
    _, server, client = provider
    received = []
    with pytest.raises(aimesh.UnavailableError) as caught:
        async for piece in client.text.stream_generate("gpt-test", [("user", "cut")]):
            received.append(piece.text_delta)
    assert received == ["Partial answer"]
    assert caught.value.reason == "STREAM_INTERRUPTED"
    await assert_still_serving(server, client)


@pytest.mark.parametrize(
    ("kwargs", "code", "field"),
    [
        (dict(messages=[]), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        (dict(messages=[("user", "  ")]), grpc.StatusCode.INVALID_ARGUMENT, "messages[0].content"),
        (dict(messages=QUESTION, max_tokens=0), grpc.StatusCode.OUT_OF_RANGE, "max_tokens"),
        (dict(messages=QUESTION, max_tokens=100_000), grpc.StatusCode.OUT_OF_RANGE, "max_tokens"),
        (dict(messages=QUESTION, temperature=2.5), grpc.StatusCode.OUT_OF_RANGE, "temperature"),
        (dict(messages=QUESTION, top_p=1.5), grpc.StatusCode.OUT_OF_RANGE, "top_p"),
        (dict(messages=QUESTION, stop=["a", ""]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    ],
)
async def test_bad_input_is_refused_before_the_provider_is_called(provider, kwargs, code, field):
    standin, server, client = provider
    calls = len(standin.requests)
    with pytest.raises(aimesh.AimeshError) as caught:
        await client.text.generate("gpt-test", **kwargs)
    assert caught.value.code == code and caught.value.reason == "INVALID_FIELD"
    assert caught.value.metadata["field"] == field and field in caught.value.field_violations
    assert len(standin.requests) == calls, "a bad request was sent to the provider"
    await assert_still_serving(server, client)
