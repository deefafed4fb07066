"""What a streamed message costs through the front door: HTTP/JSON SSE vs gRPC.

One text model whose pool is `aimesh serve openai` in front of an instant provider (a
small HTTP server streaming N one-token chunks with no model behind them), so the only
costs are the adapter's and the front door's. The same stream of N messages is read,
calls taking turns within each round:
- direct: gRPC to the adapter (the baseline),
- via Envoy, gRPC (the SDK),
- via Envoy, HTTP/JSON SSE (`/v1/models/{model}:streamGenerate`, read with httpx),
for aimesh's Envoy (tenancy off and on) and, with --dissect, copies of its generated
config with one part changed (no Lua, transcoder only, ...), all routing to the same
adapter. Printed: p50 of a whole stream and of the mean arrival time of its messages, each
with what the route adds over direct (the latter: what each streamed message waits).

    .venv/bin/python bench/bench_sse.py [--messages 16] [--rounds 15] [--dissect] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aimesh
import common  # bench/common.py
import httpx
import yaml
from aimesh_servers.mesh.tenancy_envoy import _LUA_ATTEMPT_CAP, LUA_FILTER
from aimesh_servers.models import builtin
from bench_openai_adapter import _Instant
from bench_overhead import Envoy, _hcm, server_address

from tests.mesh.conftest import Mesh
from tests.service.test_openai_adapter import chunk, transformers_serve

MODEL = "chat"
PROMPT = [("user", "Count.")]
REGISTRY = """
kind: aimesh/registry/v1
models:
  - id: chat
    capability: text_generation
    versions: [{{version: "1", source: "{source}"}}]
    pools:
      - id: cloud
        serve: openai
        replicas: 1
        source: "{source}"
        env: {{AIMESH_OPENAI_BASE_URL: "{base}", AIMESH_OPENAI_API_KEY: "sk-bench"}}
"""


class _Paced(_Instant):
    """Streams max_tokens one-token chunks, GAP_S apart, as a model would."""

    GAP_S = 0.0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = body["max_tokens"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        events = [chunk(), *(chunk(" token") for _ in range(n)), chunk(finish="length"),
                  chunk(usage={"prompt_tokens": 12, "completion_tokens": n})]
        for event in events:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
            time.sleep(self.GAP_S)
        self.wfile.write(b"data: [DONE]\n\n")


def _filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    return _hcm(config)["http_filters"]


def _keep_filters(*names: str) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        _hcm(config)["http_filters"] = [f for f in _filters(config) if f["name"].rsplit(".", 1)[1] in names]
    return edit


def _without_access_log(config: dict[str, Any]) -> None:
    _hcm(config).pop("access_log", None)


# Copies of the generated config (tenancy off: its Lua routes HTTP/JSON calls by model,
# which these need) with one part changed; all route to the same adapter.
def _without_lua_response_hook(config: dict[str, Any]) -> None:
    """The Lua filter without envoy_on_response (the attempt cap's)."""
    for f in _filters(config):
        if f["name"] == LUA_FILTER:
            source = f["typed_config"]["default_source_code"]
            source["inline_string"] = source["inline_string"].replace(_LUA_ATTEMPT_CAP, "")


DISSECT: dict[str, Callable[[dict[str, Any]], None]] = {
    "aimesh config, as generated": lambda config: None,
    "- lua response hook": _without_lua_response_hook,
    "transcoder + lua + router": _keep_filters("grpc_json_transcoder", "lua", "router"),
    "- header_mutation": _keep_filters("grpc_json_transcoder", "lua", "router", "jwt_authn"),
    "- access log": _without_access_log,
}


class Target:
    def __init__(self, name: str, address: str, token: str | None = None) -> None:
        self.name, self.address, self.token = name, address, token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=f"http://{address}", timeout=30, headers=headers)
        self.grpc = aimesh.Client(address, token=token, timeout=30, max_attempts=1)

    def sse(self, messages: int) -> list[float]:
        """One stream over HTTP/JSON SSE: when each message arrived (perf_counter)."""
        body = {"messages": [{"role": "ROLE_USER", "content": c} for _, c in PROMPT], "max_tokens": messages}
        with self.http.stream("POST", f"/v1/models/{MODEL}:streamGenerate", json=body) as response:
            response.raise_for_status()
            return [time.perf_counter() for line in response.iter_lines() if line.startswith("data: ")]

    def stream(self, messages: int) -> list[float]:
        """The same stream over gRPC with the SDK."""
        return [time.perf_counter() for _ in self.grpc.text.stream_generate(MODEL, PROMPT, max_tokens=messages)]

    def close(self) -> None:
        self.http.close()
        self.grpc.close()


@dataclass
class Timings:
    """Per call, in ms from the call's start: the last message, and the mean over its messages."""

    total: list[float] = field(default_factory=list)
    mean_arrival: list[float] = field(default_factory=list)
    messages: int = 0


def measure(runs: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, Timings]:
    """Runs take turns in each round (round 0 warms up)."""
    timings = {name: Timings() for name in runs}
    for round_ in range(rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            arrivals = [(t - start) * 1000 for t in run()]
            if round_:
                timings[name].total.append(arrivals[-1])
                timings[name].mean_arrival.append(statistics.fmean(arrivals))
                timings[name].messages = len(arrivals)
    return timings


@contextlib.contextmanager
def provider(args: argparse.Namespace, folder: Path) -> Iterator[tuple[str, str]]:
    """(API root, model name) of the OpenAI-compatible provider behind the adapter."""
    if args.provider == "model":
        weights = builtin.resolve("builtin:smollm2-135m-instruct")
        with transformers_serve(weights, folder / "provider.log") as base:
            yield base, weights
        return
    _Paced.GAP_S = args.gap_ms / 1000
    instant = ThreadingHTTPServer(("127.0.0.1", 0), _Paced)
    instant.daemon_threads = True
    threading.Thread(target=instant.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{instant.server_address[1]}/v1", "instant"
    finally:
        instant.shutdown()


def main(args: argparse.Namespace) -> None:
    meshes: list[Mesh] = []
    envoys: list[Envoy] = []
    targets: list[Target] = []
    with tempfile.TemporaryDirectory() as tmp, provider(args, Path(tmp)) as (base, source):
        folder = Path(tmp)
        (folder / "registry.yaml").write_text(REGISTRY.format(base=base, source=source))
        try:
            for tenancy in (False, True):
                mesh = Mesh(folder / f"mesh-{tenancy}", registry=folder / "registry.yaml", tenancy=tenancy)
                meshes.append(mesh)
            for mesh in meshes:
                mesh.wait_ready()
            plain, with_tenancy = meshes
            targets.append(Target("direct", server_address(plain.state_dir)))
            targets.append(Target("aimesh envoy", plain.front))
            targets.append(Target("aimesh envoy, tenancy on", with_tenancy.front, with_tenancy.token))
            if args.dissect:
                generated = yaml.safe_load((plain.state_dir / "envoy.yaml").read_text())
                for k, (name, edit) in enumerate(DISSECT.items()):
                    config = copy.deepcopy(generated)
                    edit(config)
                    envoy = Envoy(config, folder, f"dissect{k}")
                    envoys.append(envoy)
                    targets.append(Target(f"dissect: {name}", envoy.address))
            runs: dict[str, Callable[[], list[float]]] = {}
            for target in targets:
                runs[f"{target.name} / grpc"] = lambda t=target: t.stream(args.messages)
                if target.name != "direct":
                    runs[f"{target.name} / sse"] = lambda t=target: t.sse(args.messages)
            deadline = time.monotonic() + 60
            while True:  # until Envoy's health checks route to the adapter
                try:
                    for run in runs.values():
                        run()
                    break
                except (aimesh.AimeshError, httpx.HTTPError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            timings = measure(runs, args.rounds)
        finally:
            for target in targets:
                target.close()
            for envoy in envoys:
                envoy.stop()
            for mesh in meshes:
                mesh.stop()

    direct = timings["direct / grpc"]
    print(f"{args.messages}-token streams ({direct.messages} messages with the first and last), "
          f"{args.rounds} rounds, calls taking turns; load average {common.machine_info()['load_average']}")
    print(f"  {'route':52s} {'stream p50 ms':>13s} {'added':>7s} {'mean message arrival p50 ms':>28s} "
          f"{'added':>7s}")
    rows: dict[str, Any] = {}
    base_total, base_mean = statistics.median(direct.total), statistics.median(direct.mean_arrival)
    for name, timing in timings.items():
        total, mean = statistics.median(timing.total), statistics.median(timing.mean_arrival)
        rows[name] = {"stream_p50_ms": round(total, 3), "added_ms": round(total - base_total, 3),
                      "mean_arrival_p50_ms": round(mean, 3), "added_per_message_ms": round(mean - base_mean, 3),
                      "messages": timing.messages}
        print(f"  {name:52s} {total:13.2f} {total - base_total:+7.2f} {mean:28.2f} {mean - base_mean:+7.2f}")
    sse = rows["aimesh envoy, tenancy on / sse"]["added_per_message_ms"]
    grpc_added = rows["aimesh envoy, tenancy on / grpc"]["added_per_message_ms"]
    goals = [common.Goal("SSE: each message's added latency over gRPC's (tenancy on)", sse - grpc_added,
                         "<= 0.3 ms", sse - grpc_added <= 0.3, f"SSE +{sse:.2f} ms, gRPC +{grpc_added:.2f} ms")]
    common.report("sse", args.json, goals, {"rows": rows, "messages": args.messages, "rounds": args.rounds})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--provider", choices=("instant", "model"), default="instant",
                        help="instant: tokens --gap-ms apart; model: `transformers serve` with SmolLM2-135M")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="the provider's time between tokens")
    parser.add_argument("--dissect", action="store_true")
    parser.add_argument("--json", help="write the results and goals here")
    main(parser.parse_args())
