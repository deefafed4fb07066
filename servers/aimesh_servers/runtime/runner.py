"""The grpc.aio runner every model server shares.

Start-up: bind, report NOT_SERVING, load the model in a worker thread, then SERVING.
SIGTERM/SIGINT: NOT_SERVING at once (Envoy's health checks move traffic away), keep
serving for `drain_delay_s`, then stop accepting and give calls in flight
`drain_grace_s` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..registry.consul import ConsulRegistrar
from ..registry.discovery import Instance, LocalRegistrar, Registrar
from . import accounting
from .admission import Admission
from .cache import build_cache
from .interceptor import AimeshServerInterceptor
from .logs import CallLog
from .metrics import ServerMetrics
from .service import Capability
from .settings import ServerSettings
from .tracing import CallTracer
from .usage_reporter import UsageReporter
from .watchdog import Watchdog

log = logging.getLogger(__name__)


class ModelServer:
    def __init__(self, settings: ServerSettings, capabilities: Sequence[Capability]) -> None:
        self.settings = settings
        self.capabilities = list(capabilities)
        # Slots: the calls the engines run at once (`capacity`, e.g. a text batch's
        # sequences), else `max_concurrency` for an engine that states none.
        slots = sum(getattr(getattr(cap, "engine", None), "capacity", None) or settings.max_concurrency
                    for cap in self.capabilities)
        self.limit = Admission(slots, settings.max_queue, settings.queue_timeout_s)
        # Every admitted call's engine work gets a thread at once: no queue behind the slots.
        self.executor = ThreadPoolExecutor(slots + settings.spare_threads,
                                           thread_name_prefix="aimesh-engine")
        self.health = health.aio.HealthServicer()
        self.watchdog = Watchdog(settings.watchdog_stall_s, self._set_serving)
        self.server: grpc.aio.Server | None = None  # made in start(): it binds to the running loop
        self.port = 0
        self.registrar: Registrar | None = (
            ConsulRegistrar(settings.consul_http_addr, tls=settings.tls_cert is not None)
            if settings.consul_http_addr
            else LocalRegistrar(settings.registry_dir) if settings.registry_dir else None
        )
        self.instances: list[Instance] = []
        self.tls = settings.tls_files()  # None: plaintext
        # A TlsFiles of its own: each user of the files notices a rotation for itself.
        self.usage = UsageReporter(settings.usage_addr, settings.tls_files()) if settings.usage_addr else None
        self.metrics = ServerMetrics(self.limit, settings.pool) if settings.metrics_port is not None else None
        self.cache = build_cache(settings, [m for cap in self.capabilities for m in cap.models])  # None: off
        self.tracer = CallTracer.from_settings(settings)  # None: tracing off
        self._stopping = asyncio.Event()

    @property
    def service_names(self) -> list[str]:
        return [name for cap in self.capabilities for name in cap.service_names]

    async def _set_health(self, status: int) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def _set_serving(self, serving: bool) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.SERVING if serving
                               else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def start(self) -> int:
        self.server = grpc.aio.server(
            interceptors=[AimeshServerInterceptor(self.limit, self.executor, self.watchdog, self.tracer,
                                                  cache=self.cache)],
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        for cap in self.capabilities:
            cap.add_to_server(self.server)
        if self.usage is not None:
            self.usage.start()
            accounting.install_sink(self.usage)
        metrics = ""
        if self.metrics is not None:
            metrics = f", metrics on :{self.metrics.serve(self.settings.host, self.settings.metrics_port)}"
            accounting.install_sink(self.metrics)
        accounting.install_sink(CallLog())
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        address = f"{self.settings.host}:{self.settings.port}"
        self.port = (self.server.add_secure_port(address, self.tls.server_credentials()) if self.tls
                     else self.server.add_insecure_port(address))
        if self.tracer is not None:
            self.tracer.bind(f"{self.settings.advertise_host or self.settings.host}:{self.port}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        tls = ", mutual TLS" if self.tls else ""
        announce(f"listening on {self.settings.host}:{self.port}{metrics}{tls} (loading models)")
        await self._register()
        started = time.monotonic()
        for cap in self.capabilities:
            await asyncio.to_thread(cap.load)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.watchdog.start()
        models = ", ".join(m.id for cap in self.capabilities for m in cap.models)
        announce(f"serving {models} on port {self.port} (loaded in {time.monotonic() - started:.1f}s)")
        return self.port

    async def _register(self) -> None:
        """Registered while still loading: the mesh's health checks hold traffic until SERVING."""
        if self.registrar is None:
            return
        host = self.settings.advertise_host or self.settings.host
        for cap in self.capabilities:
            for model in cap.models:
                instance = Instance(
                    id=f"{model.id}-{self.settings.pool}-{host}-{self.port}", address=host,
                    port=self.port, model=model.id, pool=self.settings.pool,
                    version=model.version, grpc_service=cap.service_names[0],
                )
                await asyncio.to_thread(self.registrar.register, instance)  # HTTP off the loop
                self.instances.append(instance)

    async def drain(self, served: bool = True) -> None:
        """Deregister and go NOT_SERVING, keep serving a moment (when it `served` at all),
        then stop with a grace period and close everything start() opened."""
        announce("draining: NOT_SERVING")
        self.watchdog.stop()
        for instance in self.instances:
            await asyncio.to_thread(self.registrar.deregister, instance)  # type: ignore[union-attr]
        self.instances.clear()
        await self.health.enter_graceful_shutdown()
        if served:
            await asyncio.sleep(self.settings.drain_delay_s)
        if self.server is not None:
            await self.server.stop(self.settings.drain_grace_s)
        self.executor.shutdown(wait=False)
        if self.cache is not None:
            await self.cache.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.tracer is not None:  # after the last call ended: its spans go out too
            await asyncio.to_thread(self.tracer.shutdown)
        if self.usage is not None:  # after the last call ended: its usage goes out too
            accounting.install_sink(None)
            await self.usage.close()
        announce("stopped")

    async def run_until_signal(self) -> int:
        """Serves until SIGTERM/SIGINT, then drains; the process's exit status. A start that
        fails (a model that does not load) deregisters, closes what it opened, says why on
        one line and returns 1, so no registration outlives the process."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        start = asyncio.create_task(self.start())
        stop = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        if start.done() and (failure := start.exception()) is not None:
            log.error("start failed", exc_info=failure)
            stop.cancel()
            await self.drain(served=False)
            models = ", ".join(m.id for cap in self.capabilities for m in cap.models)
            why = " ".join(f"{type(failure).__name__}: {failure}".split())
            announce(f"failed to start {models}: {why}")
            return 1
        if start.done():
            await stop
        await self.drain()
        if not start.done():
            start.cancel()
        return 0


def announce(message: str) -> None:
    """One line on stdout per life-cycle step: `aimesh up` and the tests read them."""
    print(f"[aimesh-server] {message}", flush=True)
    sys.stdout.flush()
