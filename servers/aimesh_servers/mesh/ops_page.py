"""The operator page: `aimesh status` in a browser, with small live charts.

`aimesh up` starts it on 127.0.0.1 (`--ops-port`, default 9902), on the admin side,
never behind the tenant front door. It serves
- `/`: a static page (ops_static/: HTML, CSS and plain JS, no build step, no CDN) that
  polls `/api/status` every second and draws each model, its pools in fallback order,
  each endpoint's health and Envoy's view, and inline SVG charts;
- `/api/status`: the same view as `aimesh status --json` (status.collect, sampled once a
  second by one thread, however many pages look, and only while one looked in the last
  IDLE_AFTER_S: an unwatched mesh pays nothing), plus `history`: per model, the last
  HISTORY_POINTS samples of calls/s, p95, error rate and fallback rate.
An endpoint that was seen and then left (its server was killed: discovery and Envoy
drop it) stays on the page as `down`, with `gone_s`, for the length of the history.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from dataclasses import asdict
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from .status import collect

SAMPLE_INTERVAL_S = 1.0
HISTORY_POINTS = 300  # 5 minutes at one sample a second
IDLE_AFTER_S = 300.0
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("ops_static", name).read_bytes()


class StatusSampler:
    """Looks at the mesh every `interval_s` in a thread; keeps the last view and a history."""

    def __init__(self, front: str, admin_url: str, state_dir: Path,
                 interval_s: float = SAMPLE_INTERVAL_S, points: int = HISTORY_POINTS) -> None:
        self.front = front
        self.admin_url = admin_url
        self.state_dir = state_dir
        self.interval_s = interval_s
        self.points = points
        self._lock = threading.Lock()
        self._sampling = threading.Lock()
        self._view: dict[str, Any] = {"time": None, "models": [], "history": {}, "error": "not sampled yet"}
        self._history: dict[str, deque[dict[str, Any]]] = {}
        # (model, pool, address) -> when it was last seen; for endpoints that left.
        self._seen: dict[tuple[str, str, str], float] = {}
        self._stop = threading.Event()
        self._watched = threading.Event()
        self._last_viewed = -math.inf
        self._thread = threading.Thread(target=self._run, name="aimesh-ops-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._watched.set()
        self._thread.join(5)

    def view(self) -> dict[str, Any]:
        idle = time.monotonic() - self._last_viewed > IDLE_AFTER_S
        self._last_viewed = time.monotonic()
        if idle:  # the first look in a while: answer with a fresh sample, and keep sampling
            self.sample()
            self._watched.set()
        with self._lock:
            return self._view

    def _run(self) -> None:
        while not self._stop.is_set():
            self._watched.wait()
            if time.monotonic() - self._last_viewed > IDLE_AFTER_S:
                self._watched.clear()
                continue
            if self._stop.wait(self.interval_s):
                return
            self.sample()

    def sample(self) -> None:
        with self._sampling:  # the thread, or a page's first look after a while
            self._sample()

    def _sample(self) -> None:
        now = time.time()
        try:
            models = [asdict(m) for m in collect(self.front, self.admin_url, self.state_dir)]
            error = None
        except RuntimeError as exc:
            models, error = [], str(exc)
        for model in models:
            self._add_gone_endpoints(model, now)
            self._history.setdefault(model["id"], deque(maxlen=self.points)).append({
                key: model[key] for key in ("calls_per_s", "p95_ms", "error_rate", "fallback_rate")}
                | {"time": now})
        view = {"time": now, "models": models, "error": error,
                "history": {model: list(points) for model, points in self._history.items()}}
        with self._lock:
            self._view = view

    def _add_gone_endpoints(self, model: dict[str, Any], now: float) -> None:
        """Adds, as down, the endpoints seen before that no list has now."""
        forget_after = self.points * self.interval_s
        for pool in model["pools"]:
            key = (model["id"], pool["id"])
            shown = {e["address"] for e in pool["endpoints"]}
            for endpoint in pool["endpoints"]:
                if ":" in endpoint["address"] and endpoint["state"] != "down":  # not "pid N"
                    self._seen[(*key, endpoint["address"])] = now
            for (model_id, pool_id, address), seen in list(self._seen.items()):
                if (model_id, pool_id) != key or address in shown:
                    continue
                if now - seen > forget_after:
                    del self._seen[(model_id, pool_id, address)]
                else:
                    pool["endpoints"].append({"address": address, "state": "down", "envoy": "absent",
                                              "gone_s": round(now - seen, 1)})


class _Handler(BaseHTTPRequestHandler):
    def __init__(self, page: OpsPage, *args: Any) -> None:
        self.page = page
        super().__init__(*args)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/api/status":
            self._send(200, "application/json", json.dumps(self.page.sampler.view()).encode())
        elif path in STATIC:
            name, content_type = STATIC[path]
            self._send(200, content_type, _static(name))
        else:
            self._send(404, "text/plain; charset=utf-8", f"no page {path!r}; try /\n".encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.send_header("cache-control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # the page polls every second
        pass


class OpsPage:
    """The page's HTTP server on 127.0.0.1:`port` (0: a free one), in a thread."""

    def __init__(self, port: int, front: str, admin_url: str, state_dir: Path) -> None:
        self.sampler = StatusSampler(front, admin_url, state_dir)
        self._http = ThreadingHTTPServer(("127.0.0.1", port), partial(_Handler, self))
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]

    def start(self) -> None:
        self.sampler.start()
        threading.Thread(target=self._http.serve_forever, name="aimesh-ops-page", daemon=True).start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self.sampler.close()
