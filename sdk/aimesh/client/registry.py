"""The model registry: `client.registry.list_models()`, `.get_model(id)`, `.list_versions(id)`."""

from __future__ import annotations

from ..registry.v1 import registry_pb2 as pb
from ..registry.v1 import registry_pb2_grpc as pb_grpc
from .transport import AsyncTransport, Transport


class RegistryClient:
    """Blocking registry calls. Pools come in fallback order, with live health."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._stub = pb_grpc.ModelRegistryServiceStub(transport.channel)

    def list_models(self, capability: pb.Capability.ValueType = pb.CAPABILITY_UNSPECIFIED, *,
                    timeout: float | None = None) -> list[pb.Model]:
        request = pb.ListModelsRequest(capability=capability)
        return list(self._t.unary(self._stub.ListModels, request, timeout=timeout).models)

    def get_model(self, model_id: str, *, timeout: float | None = None) -> pb.Model:
        request = pb.GetModelRequest(model_id=model_id)
        return self._t.unary(self._stub.GetModel, request, timeout=timeout).model

    def list_versions(self, model_id: str, *, timeout: float | None = None
                      ) -> pb.ListModelVersionsResponse:
        request = pb.ListModelVersionsRequest(model_id=model_id)
        return self._t.unary(self._stub.ListModelVersions, request, timeout=timeout)


class AsyncRegistryClient:
    """Awaitable registry calls (same methods as RegistryClient)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport
        self._stub = pb_grpc.ModelRegistryServiceStub(transport.channel)

    async def list_models(self, capability: pb.Capability.ValueType = pb.CAPABILITY_UNSPECIFIED, *,
                          timeout: float | None = None) -> list[pb.Model]:
        request = pb.ListModelsRequest(capability=capability)
        return list((await self._t.unary(self._stub.ListModels, request, timeout=timeout)).models)

    async def get_model(self, model_id: str, *, timeout: float | None = None) -> pb.Model:
        request = pb.GetModelRequest(model_id=model_id)
        return (await self._t.unary(self._stub.GetModel, request, timeout=timeout)).model

    async def list_versions(self, model_id: str, *, timeout: float | None = None
                            ) -> pb.ListModelVersionsResponse:
        request = pb.ListModelVersionsRequest(model_id=model_id)
        return await self._t.unary(self._stub.ListModelVersions, request, timeout=timeout)
