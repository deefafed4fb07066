"""`aimesh up`: the whole local mesh on one machine.

Starts the control server (registry API, reflection, unknown-model answers) in this
process, writes and validates the Envoy config, starts Envoy, starts the model
servers the registry asks for (`replicas` per pool), and keeps Envoy's endpoints in
step with the servers that registered (a local registration folder, or Consul with
`--consul ADDR`: servers started elsewhere register there too).
Ctrl-C drains the servers, then stops Envoy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..capabilities import CAPABILITIES
from ..control.servicer import ControlCapability, EnvoyHealth
from ..jobs.process import supervise_workers
from ..registry.consul import ConsulDiscovery
from ..registry.discovery import Discovery, LocalDiscovery
from ..registry.schema import Model, Pool, Registry, RegistryError, load_registry
from ..runtime.runner import ModelServer
from ..runtime.settings import ServerSettings
from ..tenancy.bootstrap import LocalAccess
from ..tenancy.plane import TenancyPlane, TenancySettings, load_issuers
from . import envoy_process
from .access import MeshAccess
from .certs import CONSUL_AGENT, CONTROL, MODEL_SERVER, CertStore, ensure
from .children import terminate_with_parent
from .controller import EndpointController
from .envoy_config import MeshSpec
from .ops_page import OpsPage
from .status import LiveFigures, ReadinessServer, recorded_costs


def say(message: str) -> None:
    print(f"[aimesh] {message}", flush=True)


@dataclass
class ServerProc:
    model: Model
    pool: Pool
    index: int
    proc: asyncio.subprocess.Process
    log_path: Path
    serving: asyncio.Event = field(default_factory=asyncio.Event)
    metrics_port: int = 0

    @property
    def name(self) -> str:
        return f"{self.model.id}/{self.pool.id}#{self.index}"


async def _start_server(model: Model, pool: Pool, index: int, state: Path,
                        consul: str | None, usage_addr: str, metrics_port: int = 0,
                        trace_env: dict[str, str] | None = None,
                        tls_env: dict[str, str] | None = None, cache_url: str | None = None) -> ServerProc:
    version = model.default
    args = [sys.executable, "-m", "aimesh_servers.cli", "serve", pool.serve, "--model", model.id,
            "--source", pool.source or version.source, "--version", version.version, "--pool", pool.id]
    registration = ({"AIMESH_CONSUL_HTTP_ADDR": consul} if consul
                    else {"AIMESH_REGISTRY_DIR": str(state / "registrations")})
    env = {**os.environ, **registration, "AIMESH_USAGE_ADDR": usage_addr,
           "AIMESH_METRICS_PORT": str(metrics_port), **(trace_env or {}),
           "AIMESH_MAX_CONCURRENCY": str(pool.max_concurrency), **(tls_env or {}),
           **_cache_env(model, cache_url), **pool.env}
    log_path = state / "logs" / f"{model.id}-{pool.id}-{index}.log"
    proc = await asyncio.create_subprocess_exec(
        *terminate_with_parent(args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL, env=env, start_new_session=True)
    return ServerProc(model, pool, index, proc, log_path, metrics_port=metrics_port)


def _cache_env(model: Model, redis_url: str | None) -> dict[str, str]:
    """The model's response cache policy for its servers; with --redis every replica shares it."""
    if model.cache is None:
        return {}
    return {**model.cache.env(), **({"AIMESH_CACHE_URL": redis_url} if redis_url else {})}


async def _follow(server: ServerProc) -> None:
    """Copies a server's output to its log; echoes its life-cycle lines."""
    assert server.proc.stdout is not None
    with open(server.log_path, "ab") as log:
        async for line in server.proc.stdout:
            log.write(line)
            log.flush()
            text = line.decode(errors="replace").rstrip()
            if text.startswith("[aimesh-server]"):
                say(f"{server.name}: {text.removeprefix('[aimesh-server] ')}")
                if " serving " in text:
                    server.serving.set()
    say(f"{server.name}: exited with {await server.proc.wait()} (log: {server.log_path})")


# A server that crashes this often within this window is in a crash loop: it stays down.
CRASH_LOOP_CRASHES = 5
CRASH_LOOP_WINDOW_S = 60.0
RESTART_BACKOFF_MAX_S = 30.0


async def _supervise(server: ServerProc, restart: Callable[[], Awaitable[ServerProc]],
                     stop: asyncio.Event, restarted: Callable[[], None]) -> None:
    """Follows a server and restarts it, with backoff (1, 2, 4... s), each time it dies by a
    crash (a non-zero exit or a signal; a drained server exits 0). The new process
    registers itself on a new port and the endpoint controller hands it to Envoy, so it
    rejoins routing without an Envoy restart. After CRASH_LOOP_CRASHES crashes within
    CRASH_LOOP_WINDOW_S it gives up and prints the last lines of the server's log."""
    loop = asyncio.get_running_loop()
    crashes: list[float] = []
    while True:
        await _follow(server)
        code = server.proc.returncode
        if stop.is_set() or code == 0:
            return
        now = loop.time()
        crashes = [t for t in crashes if now - t < CRASH_LOOP_WINDOW_S] + [now]
        if len(crashes) >= CRASH_LOOP_CRASHES:
            say(f"{server.name}: crashed {len(crashes)} times in {CRASH_LOOP_WINDOW_S:.0f}s: "
                f"not restarting it again. Last lines of {server.log_path}:")
            for line in _last_lines(server.log_path, 20):
                say(f"  | {line}")
            return
        delay = min(2.0 ** (len(crashes) - 1), RESTART_BACKOFF_MAX_S)
        say(f"{server.name}: crashed (exit {code}); restarting in {delay:g}s "
            f"(crash {len(crashes)} of {CRASH_LOOP_CRASHES} allowed in {CRASH_LOOP_WINDOW_S:.0f}s)")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
            return
        server.proc = (await restart()).proc
        say(f"{server.name}: restarted (pid {server.proc.pid})")
        restarted()


def _last_lines(path: Path, count: int) -> list[str]:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace").splitlines()[-count:]
    return []


async def _wait_routable(servers: list[ServerProc], controller: EndpointController,
                         envoy_health: EnvoyHealth, timeout_s: float = 120.0) -> None:
    """Until every server has loaded and Envoy's health checks route to it (so the first
    call after "mesh ready" reaches the first pool of its chain)."""
    await asyncio.gather(*(s.serving.wait() for s in servers))
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        healthy = await envoy_health.healthy_endpoints() or {}
        pending = [i for i in controller.instances
                   if f"{i.address}:{i.port}" not in healthy.get(f"model_{i.model}", ())]
        if not pending:
            return
        await asyncio.sleep(0.2)
    say(f"warning: Envoy does not route to {len(pending)} server(s) yet: "
        + ", ".join(f"{i.model}/{i.pool}@{i.port}" for i in pending))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_prometheus_config(state: Path, servers: list[ServerProc], admin_port: int) -> Path:
    """A scrape config for Prometheus: every model server's /metrics and Envoy's stats."""
    path = state / "prometheus.yml"
    path.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "15s"},
        "scrape_configs": [
            {"job_name": "aimesh-servers", "metrics_path": "/metrics", "static_configs": [
                {"targets": [f"127.0.0.1:{s.metrics_port}"], "labels": {"server": s.name}}
                for s in servers]},
            {"job_name": "envoy", "metrics_path": "/stats/prometheus",
             "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}]},
        ],
    }, sort_keys=False))
    return path


def _start_ops_page(port: int, spec: MeshSpec) -> OpsPage:
    """The operator page on 127.0.0.1; a free port when the asked one is taken."""
    front_host = "127.0.0.1" if spec.listen_host in ("0.0.0.0", "::") else spec.listen_host
    page_args = (f"{front_host}:{spec.port}", f"http://127.0.0.1:{spec.admin_port}", spec.state_dir)
    try:
        page = OpsPage(port, *page_args)
    except OSError as exc:
        say(f"warning: operator page port {port} is taken ({exc.strerror}): using a free one")
        page = OpsPage(0, *page_args)
    page.start()
    return page


def _tls_settings(store: CertStore | None, identity: str) -> dict[str, Path]:
    """A server's mutual TLS settings (runtime.settings) as one identity of the store; {}: plaintext."""
    if store is None:
        return {}
    return {"tls_cert": store.cert_path(identity), "tls_key": store.key_path(identity),
            "tls_ca": store.bundle_path}


def _mesh_tls(args: argparse.Namespace, state: Path) -> tuple[CertStore | None, tuple[Path, Path] | None]:
    """--mtls: the certificates folder (made on first use); --tls-cert/--tls-key: the front door's."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    front = (Path(args.tls_cert).resolve(), Path(args.tls_key).resolve()) if args.tls_cert else None
    if not args.mtls:
        return None, front
    store = ensure(Path(args.certs_dir or state / "certs").resolve())
    say(f"mutual TLS inside the mesh: certificates in {store.root} "
        f"(rotate: aimesh certs rotate --dir {store.root})")
    if args.consul:  # servers register TLS checks: the agent needs a client certificate
        say(f"Consul checks the servers over TLS: give the agent enable_agent_tls_for_checks and "
            f"{store.cert_path(CONSUL_AGENT)} (consul/tls.hcl)")
    return store, front


def _trace_env(args: argparse.Namespace) -> dict[str, str]:
    """--otlp: Envoy and every server this starts export their spans there; {}: tracing off."""
    if not args.otlp:
        return {}
    host, _, port = args.otlp.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--otlp wants HOST:PORT of an OTLP/gRPC collector, got {args.otlp!r}")
    if not 0 <= args.trace_sample_ratio <= 1:
        raise ValueError(f"--trace-sample-ratio must be within 0..1, got {args.trace_sample_ratio}")
    say(f"tracing: spans go to {args.otlp} over OTLP/gRPC (new traces sampled at {args.trace_sample_ratio:g})")
    return {"AIMESH_OTLP_ENDPOINT": args.otlp, "AIMESH_TRACE_SAMPLE_RATIO": str(args.trace_sample_ratio)}


def _select(registry: Registry, only: list[str] | None) -> Registry:
    if not only:
        return registry
    unknown = sorted(set(only) - set(CAPABILITIES))
    if unknown:
        raise RegistryError(f"--only: unknown server kinds {unknown}; known: {sorted(CAPABILITIES)}")
    models = [m for m in registry.models if any(p.serve in only for p in m.pools)]
    if not models:
        raise RegistryError(f"--only {only}: no model in the registry is served by those kinds")
    return registry.model_copy(update={"models": models})


def _banner(spec: MeshSpec, access: LocalAccess | None) -> str:
    front = f"{spec.listen_host}:{spec.port}"
    text_model = next((m.id for m in spec.registry.models if m.capability.value == "text_generation"), None)
    lines = [
        (f"mesh ready: front door {front} (gRPC and HTTP/JSON{', TLS' if spec.front_tls else ''}), "
         f"Envoy admin 127.0.0.1:{spec.admin_port}"),
    ]
    if access is not None:
        lines += [
            f"  tenant:  {access.tenant!r}; its token (every capability) is in {access.token_path}",
            f"           export AIMESH_TOKEN=$(cat {access.token_path})",
            f"  admin:   {access.admin_token_path} (aimesh tenants create|list|token|set-limit ...)",
        ]
        auth = ' -H "authorization: Bearer $AIMESH_TOKEN"'
        sdk_token = ", token=os.environ['AIMESH_TOKEN']"
    else:
        auth, sdk_token = "", ""
    lines += [
        f"  models:  curl -s http://{front}/v1/models",
        f"  grpcurl: grpcurl -plaintext {front} list",
    ]
    if text_model:
        body = '{"messages":[{"role":"ROLE_USER","content":"What is the capital of France?"}]}'
        lines += [
            f"  stream:  curl -sN{auth} http://{front}/v1/models/{text_model}:streamGenerate -d '{body}'",
            f"  python:  aimesh.Client('{front}'{sdk_token}).text.generate('{text_model}', [('user', 'Hi!')]).text",
            f"  usage:   curl -s{auth} http://{front}/v1/usage:summary",
        ]
    lines.append(f"  status:  aimesh status --front {front} --admin-port {spec.admin_port} --state-dir "
                 f"{spec.state_dir}  (/healthz, /readyz; Prometheus: {spec.state_dir}/prometheus.yml)")
    lines.append(f"  logs:    {spec.state_dir}/  (Ctrl-C stops everything)")
    return "\n".join(lines)


async def _run(args: argparse.Namespace) -> int:
    registry = _select(load_registry(args.registry), args.only)
    trace_env = _trace_env(args)
    state = Path(args.state_dir).resolve()
    for stale in ("registrations", "eds", "logs"):
        shutil.rmtree(state / stale, ignore_errors=True)
    (state / "logs").mkdir(parents=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    controller: EndpointController | None = None
    envoy_health = EnvoyHealth(f"http://127.0.0.1:{args.admin_port}")
    # The control server's port goes into the Envoy config, and the tenancy plane's
    # services are served by it: bind first, build the plane, then start serving.
    control_port = _free_port()
    certs, front_tls = _mesh_tls(args, state)
    # aimesh status, the operator page and job workers speak TLS where the mesh does.
    MeshAccess(front_cert=str(front_tls[0]) if front_tls else None,
               mesh_certs=str(certs.root) if certs else None).write(state)
    server_tls_env = {f"AIMESH_{k.upper()}": str(v) for k, v in _tls_settings(certs, MODEL_SERVER).items()}
    readiness = ReadinessServer(registry, f"http://127.0.0.1:{args.admin_port}")
    spec = MeshSpec(registry=registry, state_dir=state, control_port=control_port,
                    port=args.port, admin_port=args.admin_port, listen_host=args.listen,
                    tenancy=not args.no_tenancy, readiness_port=readiness.port,
                    otlp_endpoint=args.otlp or "", trace_sample_ratio=args.trace_sample_ratio,
                    mesh_certs=certs.root if certs else None, front_tls=front_tls)
    if args.no_tenancy:
        say("WARNING: tenancy is OFF (--no-tenancy): every caller is served without a token or "
            "limits, and TenantService refuses everyone. Never expose this front door.")
    plane = await asyncio.to_thread(TenancyPlane, spec, registry, TenancySettings(
        enforce=not args.no_tenancy, database_url=args.database, redis_url=args.redis,
        front_doors=args.front_doors, trusted_issuers=load_issuers(args.trust_issuer)))
    access = None if args.no_tenancy else await asyncio.to_thread(plane.bootstrap)
    control = ModelServer(
        ServerSettings(port=control_port, drain_delay_s=0, drain_grace_s=1, max_concurrency=256,
                       otlp_endpoint=args.otlp, trace_sample_ratio=args.trace_sample_ratio,
                       **_tls_settings(certs, CONTROL)),
        [ControlCapability(registry, lambda: controller.instances if controller else [], envoy_health,
                           LiveFigures(registry, state / "access.log", args.stats_window_s,
                                       cost=recorded_costs(plane.engine))),
         *plane.capabilities],
    )
    await control.start()
    controller = EndpointController(spec, registry)
    config = envoy_process.write_config(spec, controller)
    await plane.start()
    await asyncio.to_thread(envoy_process.validate, config)
    say(f"envoy config valid: {config}")
    envoy = envoy_process.start(config, state / "logs" / "envoy.log")
    servers: list[ServerProc] = []
    tasks: list[asyncio.Task[None]] = []
    closers: list[Callable[[], None]] = []
    try:
        await asyncio.to_thread(envoy_process.wait_ready, args.admin_port, envoy)
        say(f"envoy listening on {spec.listen_host}:{spec.port} (pid {envoy.pid})")
        ops = _start_ops_page(args.ops_port, spec)
        closers.append(ops.close)
        discovery: Discovery = (ConsulDiscovery(args.consul) if args.consul
                                else LocalDiscovery(state / "registrations"))
        if args.consul:
            say(f"discovery: Consul at {args.consul} (passing instances of every model server)")
        tasks.append(asyncio.create_task(controller.run(discovery)))

        def write_servers() -> None:
            (state / "servers.json").write_text(json.dumps(
                [{"model": s.model.id, "pool": s.pool.id, "pid": s.proc.pid, "metrics_port": s.metrics_port}
                 for s in servers], indent=1))

        for model in registry.models:
            for pool in model.pools:
                for index in range(pool.replicas):
                    server = await _start_server(model, pool, index, state, args.consul,
                                                 f"127.0.0.1:{control_port}", metrics_port=_free_port(), cache_url=args.redis,
                                                 trace_env=trace_env,
                                                 tls_env=server_tls_env)
                    servers.append(server)
                    restart = functools.partial(
                        _start_server, model, pool, index, state, args.consul,
                        f"127.0.0.1:{control_port}", metrics_port=server.metrics_port, cache_url=args.redis,
                        trace_env=trace_env, tls_env=server_tls_env)
                    tasks.append(asyncio.create_task(_supervise(server, restart, stop, write_servers)))

        say(f"started {len(servers)} model server(s); loading models...")
        write_servers()
        say(f"Prometheus scrape config: {_write_prometheus_config(state, servers, args.admin_port)}")
        ready = asyncio.ensure_future(_wait_routable(servers, controller, envoy_health))
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({ready, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            await plane.jobs.start()  # job items are calls through the front door: once it routes
            if args.redis and args.job_workers > 0:
                tasks.append(asyncio.create_task(supervise_workers(
                    args.job_workers, args, f"127.0.0.1:{spec.port}", state, stop, say)))
            say(_banner(spec, access) + f"\n  page:    http://127.0.0.1:{ops.port}/  (operator page, this machine only)")
        await stop.wait()
    finally:
        stop.set()  # supervisors restart nothing from here on
        say("shutting down: draining model servers")
        for server in servers:
            if server.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    server.proc.send_signal(signal.SIGTERM)
        for server in servers:
            try:
                await asyncio.wait_for(server.proc.wait(), timeout=30)
            except TimeoutError:
                server.proc.kill()
        envoy.terminate()
        await asyncio.to_thread(envoy.wait, 10)
        for task in tasks:
            task.cancel()
        await plane.close()  # every call the servers reported and Envoy logged is written
        await control.drain()
        readiness.close()
        for close in closers:
            close()
        say("stopped")
    return 0


def run_up(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except (RegistryError, envoy_process.EnvoyError, ValueError) as exc:
        say(f"error: {exc}")
        return 2
