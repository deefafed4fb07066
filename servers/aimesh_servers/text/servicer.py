"""TextGenerationService: converts requests, calls TextEngine, streams the answer back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from aimesh.text.v1 import text_generation_pb2 as pb
from aimesh.text.v1 import text_generation_pb2_grpc as pb_grpc

from ..runtime.service import (
    ServedModel,
    requested_model,
    resolve_model,
    send_served_by,
    served_by,
)
from ..runtime.streams import iterate_in_thread
from .engine import GenerationChunk, GenerationRequest, TextEngine

FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE,
}
ROLE_NAMES = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}


class TextGenerationServicer(pb_grpc.TextGenerationServiceServicer):
    service_names = (pb.DESCRIPTOR.services_by_name["TextGenerationService"].full_name,)

    def __init__(self, model: ServedModel, engine: TextEngine, pool: str) -> None:
        self.models = (model,)
        self.engine = engine
        self.pool = pool

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_TextGenerationServiceServicer_to_server(self, server)

    def load(self) -> None:
        self.engine.load()

    def _request(self, req: pb.GenerateRequest | pb.StreamGenerateRequest) -> GenerationRequest:
        return GenerationRequest(
            messages=[(ROLE_NAMES.get(m.role, "unspecified"), m.content) for m in req.messages],
            max_tokens=req.max_tokens if req.HasField("max_tokens")
            else self.engine.limits.default_max_tokens,
            temperature=req.temperature if req.HasField("temperature") else 0.0,
            top_p=req.top_p if req.HasField("top_p") else 1.0,
            stop=tuple(req.stop),
            seed=req.seed if req.HasField("seed") else None,
        )

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
        return pb.GenerateResponse(
            text="".join(parts),
            finish_reason=FINISH[last.finish_reason],
            usage=pb.TokenUsage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens),
            served_by=served,
        )

    async def StreamGenerate(
        self, request: pb.StreamGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        served, chunks = await self._chunks(request, context)
        first = True
        async for chunk in chunks:
            if chunk.finish_reason is None:
                yield pb.StreamGenerateResponse(text_delta=chunk.text, served_by=served if first else None)
                first = False
                continue
            yield pb.StreamGenerateResponse(
                text_delta=chunk.text,
                finish_reason=FINISH[chunk.finish_reason],
                usage=pb.TokenUsage(
                    prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens
                ),
                served_by=served,
            )
