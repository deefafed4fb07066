"""TextGenerationService: converts requests, calls TextEngine, streams the answer back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from aimesh.text.v1 import text_generation_pb2 as pb
from aimesh.text.v1 import text_generation_pb2_grpc as pb_grpc

from ..runtime.service import (
    EngineServicer,
    requested_model,
    resolve_model,
    send_served_by,
    served_by,
)
from ..runtime.streams import iterate_in_thread
from .contract import generate_response, generation_request, stream_response
from .engine import GenerationChunk, GenerationRequest, TextEngine


class TextGenerationServicer(EngineServicer, pb_grpc.TextGenerationServiceServicer):
    service = pb.DESCRIPTOR.services_by_name["TextGenerationService"]
    register = staticmethod(pb_grpc.add_TextGenerationServiceServicer_to_server)
    engine: TextEngine

    def _request(self, req: pb.GenerateRequest | pb.StreamGenerateRequest) -> GenerationRequest:
        return generation_request(req, self.engine.limits.default_max_tokens)

    async def _chunks(
        self, req: pb.GenerateRequest | pb.StreamGenerateRequest, context: grpc.aio.ServicerContext
    ) -> tuple[object, AsyncIterator[GenerationChunk]]:
        asked = requested_model(req.model, context)
        model = resolve_model(self.models, asked, req.model_version)
        request = self._request(req)
        self.engine.validate(request)  # fail before any header is sent
        served = served_by(model, self.pool, asked)
        await send_served_by(context, served)
        return served, iterate_in_thread(lambda cancel: self.engine.stream(request, cancel))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        served, chunks = await self._chunks(request, context)
        parts = []
        async for chunk in chunks:
            parts.append(chunk.text)
            last = chunk
        return generate_response(parts, last, served)

    async def StreamGenerate(
        self, request: pb.StreamGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        served, chunks = await self._chunks(request, context)
        first = True
        async for chunk in chunks:
            yield stream_response(chunk, served, first)
            first = False
