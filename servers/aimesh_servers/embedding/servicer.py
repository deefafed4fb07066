"""EmbeddingService: converts requests, awaits EmbeddingEngine's batcher, answers."""

from __future__ import annotations

import grpc
from aimesh.common.v1 import common_pb2
from aimesh.embedding.v1 import embedding_pb2 as pb
from aimesh.embedding.v1 import embedding_pb2_grpc as pb_grpc

from ..runtime import tracing
from ..runtime.service import (
    EngineServicer,
    requested_model,
    resolve_model,
    send_served_by,
    served_by,
)
from .engine import EmbeddingEngine, EmbedRequest


class EmbeddingServicer(EngineServicer, pb_grpc.EmbeddingServiceServicer):
    service = pb.DESCRIPTOR.services_by_name["EmbeddingService"]
    register = staticmethod(pb_grpc.add_EmbeddingServiceServicer_to_server)
    engine: EmbeddingEngine

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        asked = requested_model(request.model, context)
        model = resolve_model(self.models, asked, request.model_version)
        embed = EmbedRequest(texts=list(request.texts), normalize=request.normalize)
        with tracing.stage("embedding.batch", texts=len(embed.texts)) as stage:
            result = await self.engine.embed_batched(embed)
            stage.set(tokens=result.tokens)
        served = served_by(model, self.pool, asked)
        await send_served_by(context, served)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=row) for row in result.vectors.tolist()],
            dimensions=result.vectors.shape[1],
            usage=common_pb2.Usage(unit="tokens", input_units=result.tokens),
            served_by=served,
        )
