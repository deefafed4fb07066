"""TextGenerationService: converts requests, calls TextEngine, streams the answer back.

The engine's async stream needs no thread per call (the engine's scheduler thread
decodes every call's sequence); each piece updates the call's usage account, so a call
cut short still reports the tokens it produced.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from aimesh.text.v1 import text_generation_pb2 as pb
from aimesh.text.v1 import text_generation_pb2_grpc as pb_grpc

from ..runtime import accounting
from ..runtime.service import (
    EngineServicer,
    requested_model,
    resolve_model,
    send_served_by,
    served_by,
)
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
        return served, self._counted(self.engine.astream(request))

    @staticmethod
    async def _counted(chunks: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
        account = accounting.current()
        async with aclosing(chunks):  # leaving early cancels the sequence at once
            async for chunk in chunks:
                if account is not None:
                    account.set_units("tokens", chunk.prompt_tokens, chunk.completion_tokens)
                yield chunk

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
