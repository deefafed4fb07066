"""The control server behind the front door: the model registry API, reflection for
every aimesh service (grpcurl through Envoy sees the whole mesh), and the answer for
calls that name a model the mesh does not have."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import timedelta

import grpc
import httpx
from aimesh.registry.v1 import registry_pb2 as pb
from aimesh.registry.v1 import registry_pb2_grpc as pb_grpc
from google.protobuf.duration_pb2 import Duration

from ..mesh.descriptors import service_names
from ..mesh.status import CallFigures, LiveFigures, ModelFigures
from ..registry.discovery import Instance
from ..registry.schema import Capability, Model, Registry
from ..runtime.errors import InvalidArgument, ModelNotFound
from ..runtime.service import MODEL_HEADER, ServedModel

CAPABILITY = {c: pb.Capability.Value(f"CAPABILITY_{c.name}") for c in Capability}


class EnvoyHealth:
    """Which endpoints Envoy considers healthy, read from its admin /clusters."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url

    async def healthy_endpoints(self) -> dict[str, set[str]] | None:
        try:
            async with httpx.AsyncClient(timeout=2.0) as http:
                data = (await http.get(f"{self.admin_url}/clusters", params={"format": "json"})).json()
        except (httpx.HTTPError, ValueError):
            return None
        healthy: dict[str, set[str]] = {}
        for cluster in data.get("cluster_statuses", []):
            for host in cluster.get("host_statuses", []):
                status = host.get("health_status", {})
                bad = status.get("failed_active_health_check") or status.get("failed_outlier_check") \
                    or status.get("eds_health_status") not in (None, "HEALTHY")
                if not bad:
                    address = host["address"]["socket_address"]
                    healthy.setdefault(cluster["name"], set()).add(
                        f"{address['address']}:{address['port_value']}")
        return healthy


def _duration_ms(ms: float) -> Duration:
    out = Duration()
    out.FromTimedelta(timedelta(milliseconds=ms))
    return out


def live_stats(figures: CallFigures, window_s: float) -> pb.LiveStats:
    out = pb.LiveStats(window=_duration_ms(window_s * 1000), calls=figures.calls,
                       calls_per_second=figures.calls_per_s, error_rate=figures.error_rate,
                       fallback_rate=figures.fallback_rate, cost_usd=figures.cost_usd)
    if figures.p50_ms is not None:
        out.latency_p50.CopyFrom(_duration_ms(figures.p50_ms))
    if figures.p95_ms is not None:
        out.latency_p95.CopyFrom(_duration_ms(figures.p95_ms))
    return out


class ModelRegistryServicer(pb_grpc.ModelRegistryServiceServicer):
    def __init__(self, registry: Registry, instances: Callable[[], Sequence[Instance]],
                 envoy: EnvoyHealth | None, live: LiveFigures | None = None) -> None:
        self.registry = registry
        self.instances = instances
        self.envoy = envoy
        self.live = live

    async def _live(self) -> dict[str, ModelFigures]:
        # A thread: it may read the access log and query the usage records (cached 1 s).
        return await asyncio.to_thread(self.live.snapshot) if self.live else {}

    def _model(self, model: Model, healthy: dict[str, set[str]] | None,
               live: ModelFigures | None = None) -> pb.Model:
        out = pb.Model(
            id=model.id, capability=CAPABILITY[model.capability], description=model.description,
            default_version=model.default.version, parameters=model.parameters, prices=model.prices,
            random_weights=model.random_weights,
            versions=[pb.ModelVersion(version=v.version, source=v.source, deprecated=v.deprecated)
                      for v in model.versions],
        )
        registered = [i for i in self.instances() if i.model == model.id]
        for priority, pool in enumerate(model.pools):
            endpoints = sorted(f"{i.address}:{i.port}" for i in registered if i.pool == pool.id)
            serving = [e for e in endpoints if healthy is not None and e in healthy.get(model.cluster, ())]
            health = (pb.POOL_HEALTH_UNSPECIFIED if healthy is None
                      else pb.POOL_HEALTH_SERVING if serving else pb.POOL_HEALTH_NOT_SERVING)
            added = out.pools.add(id=pool.id, priority=priority, health=health,
                                  endpoints=serving if healthy is not None else endpoints)
            if live is not None and self.live is not None:
                added.live.CopyFrom(live_stats(live.pools[pool.id], self.live.window_s))
        if live is not None and self.live is not None:
            out.live.CopyFrom(live_stats(live.total, self.live.window_s))
        return out

    async def _health(self) -> dict[str, set[str]] | None:
        return await self.envoy.healthy_endpoints() if self.envoy else None

    def _get(self, model_id: str) -> Model:
        if not model_id:
            raise InvalidArgument("model_id is required", field="model_id")
        model = self.registry.get(model_id)
        if model is None:
            raise ModelNotFound(model_id, [m.id for m in self.registry.models], field="model_id")
        return model

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        healthy, live = await asyncio.gather(self._health(), self._live())
        models = sorted(self.registry.models, key=lambda m: m.id)
        if request.capability:
            models = [m for m in models if CAPABILITY[m.capability] == request.capability]
        return pb.ListModelsResponse(models=[self._model(m, healthy, live.get(m.id)) for m in models])

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.GetModelResponse:
        model = self._get(request.model_id)
        healthy, live = await asyncio.gather(self._health(), self._live())
        return pb.GetModelResponse(model=self._model(model, healthy, live.get(model.id)))

    async def ListModelVersions(self, request: pb.ListModelVersionsRequest, context
                                ) -> pb.ListModelVersionsResponse:
        model = self._get(request.model_id)
        return pb.ListModelVersionsResponse(
            versions=[pb.ModelVersion(version=v.version, source=v.source, deprecated=v.deprecated)
                      for v in model.versions],
            default_version=model.default.version,
        )


class UnknownModelHandler(grpc.GenericRpcHandler):
    """Answers any model call Envoy could not route: NOT_FOUND listing the models that
    offer that service. Works for every call shape (the handler never reads the request)."""

    def __init__(self, registry: Registry, services: Sequence[str]) -> None:
        self.registry = registry
        self.services = frozenset(services)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        service = details.method.strip("/").split("/")[0]
        if service not in self.services:
            return None
        offering = [m.id for m in self.registry.models if service in m.services]
        asked = dict(details.invocation_metadata or ()).get(MODEL_HEADER, "")

        async def not_found(request_iterator, context: grpc.aio.ServicerContext):
            raise ModelNotFound(asked or "(none)", offering)
            yield  # unreachable: makes this an async generator, the shape of a streaming handler

        return grpc.stream_stream_rpc_method_handler(not_found)


class ControlCapability:
    """The control server as the runner hosts it."""

    models: Sequence[ServedModel] = ()

    def __init__(self, registry: Registry, instances: Callable[[], Sequence[Instance]],
                 envoy: EnvoyHealth | None, live: LiveFigures | None = None) -> None:
        self.registry = registry
        self.servicer = ModelRegistryServicer(registry, instances, envoy, live)
        # Reflection lists every aimesh service, so grpcurl through Envoy can describe all.
        self.service_names = service_names()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_ModelRegistryServiceServicer_to_server(self.servicer, server)
        server.add_generic_rpc_handlers([UnknownModelHandler(self.registry, self.service_names)])

    def load(self) -> None:
        """Nothing to load."""
