"""What the runner needs from a capability: its gRPC service(s), a model to load,
and the model ids it serves."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import grpc
from aimesh.common.v1 import common_pb2
from google.protobuf.descriptor import ServiceDescriptor

from .errors import InvalidArgument, ModelNotFound


@dataclass(frozen=True)
class ServedModel:
    """A logical model this server answers for, and where its weights come from."""

    id: str
    source: str
    version: str = "1"
    random_weights: bool = False
    aliases: tuple[str, ...] = field(default=())


class Capability(Protocol):
    """One capability's servicer as the runner sees it."""

    service_names: Sequence[str]
    models: Sequence[ServedModel]

    def add_to_server(self, server: grpc.aio.Server) -> None: ...

    def load(self) -> None:
        """Blocking: load the model(s). Runs in a worker thread before SERVING."""


def resolve_model(models: Sequence[ServedModel], asked: str, version: str = "") -> ServedModel:
    """The served model a request names (empty = the first one), or ModelNotFound."""
    if not asked:
        return models[0]
    for model in models:
        if asked == model.id or asked in model.aliases:
            if version and version != model.version:
                raise ModelNotFound(
                    f"{asked}@{version}", [f"{m.id}@{m.version}" for m in models],
                    field="model_version",
                )
            return model
    raise ModelNotFound(asked, [m.id for m in models])


MODEL_HEADER = "x-aimesh-model"


def requested_model(body_model: str, context: grpc.aio.ServicerContext) -> str:
    """The model a call asks for: the body's `model`, else the routing header Envoy used.

    Both may be given (the SDK and the HTTP/JSON route set both); they must agree, or
    Envoy would have routed the call by one and the server would answer for the other.
    """
    header = dict(context.invocation_metadata() or ()).get(MODEL_HEADER, "")
    if body_model and header and body_model != header:
        raise InvalidArgument(
            f"model {body_model!r} in the request differs from the {MODEL_HEADER} header "
            f"{header!r} that routed it",
            field="model",
        )
    return body_model or header


def served_by(model: ServedModel, pool: str, requested: str) -> common_pb2.ServedBy:
    return common_pb2.ServedBy(
        model=model.id, model_version=model.version, pool=pool,
        random_weights=model.random_weights, requested_model=requested or model.id,
    )


# Set by a servicer, sent by the interceptor (see `send_served_by`).
SERVED_BY_METADATA: contextvars.ContextVar[tuple[tuple[str, str], ...] | None] = (
    contextvars.ContextVar("served_by_metadata", default=None))


async def send_served_by(context: grpc.aio.ServicerContext, served: common_pb2.ServedBy) -> None:
    """Response metadata naming who served the call (HTTP/JSON callers see it as headers).

    The interceptor sends it at the right moment: with the first message of a stream, or
    with the answer of a unary call. Sending headers any earlier would commit Envoy to this
    server: a call can only fail over to the next pool until response headers went out.
    """
    SERVED_BY_METADATA.set((
        ("x-aimesh-served-model", served.model),
        ("x-aimesh-served-version", served.model_version),
        ("x-aimesh-pool", served.pool),
        ("x-aimesh-random-weights", "true" if served.random_weights else "false"),
    ))


class EngineServicer:
    """What every capability servicer shares: the model it answers for, its engine (loaded
    by the runner, in a worker thread, before the server reports SERVING) and the pool
    name it reports. Subclasses name their gRPC service and its generated registrar."""

    service: ClassVar[ServiceDescriptor]
    register: ClassVar[Callable[[Any, grpc.aio.Server], None]]

    def __init__(self, model: ServedModel, engine: Any, pool: str) -> None:
        self.models = (model,)
        self.engine = engine
        self.pool = pool

    @property
    def service_names(self) -> tuple[str, ...]:
        return (self.service.full_name,)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        self.register(self, server)

    def load(self) -> None:
        self.engine.load()
