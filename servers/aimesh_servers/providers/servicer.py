"""TextGenerationService answered by a cloud provider through OpenAICompatEngine.

Unlike the local servicer, the served-by headers go out only once the provider has
produced the first piece of the answer: a provider that fails before that (refused key,
429, 5xx, unreachable) gives a trailers-only error, which Envoy may still retry on the
next pool of the model's fallback chain.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from aimesh.common.v1 import common_pb2
from aimesh.text.v1 import text_generation_pb2 as pb
from aimesh.text.v1 import text_generation_pb2_grpc as pb_grpc

from ..runtime.service import (
    EngineServicer,
    requested_model,
    resolve_model,
    send_served_by,
    served_by,
)
from ..text.contract import generate_response, generation_request, stream_response
from ..text.request import GenerationChunk
from .openai_compat import OpenAICompatEngine


class ProviderTextServicer(EngineServicer, pb_grpc.TextGenerationServiceServicer):
    service = pb.DESCRIPTOR.services_by_name["TextGenerationService"]
    register = staticmethod(pb_grpc.add_TextGenerationServiceServicer_to_server)
    engine: OpenAICompatEngine

    def _start(
        self, req: pb.GenerateRequest | pb.StreamGenerateRequest, context: grpc.aio.ServicerContext
    ) -> tuple[common_pb2.ServedBy, AsyncIterator[GenerationChunk]]:
        asked = requested_model(req.model, context)
        model = resolve_model(self.models, asked, req.model_version)
        request = generation_request(req, self.engine.limits.default_max_tokens)
        self.engine.validate(request)
        # The upstream model name is the served model's source (`--source`).
        return served_by(model, self.pool, asked), self.engine.stream(request, model.source)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        served, stream = self._start(request, context)
        parts = []
        async with aclosing(stream) as chunks:
            async for last in chunks:
                parts.append(last.text)
        await send_served_by(context, served)
        return generate_response(parts, last, served)

    async def StreamGenerate(
        self, request: pb.StreamGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        served, stream = self._start(request, context)
        first = True
        # aclosing: a cancelled call closes the provider's HTTP stream at once, not at GC.
        async with aclosing(stream) as chunks:
            async for chunk in chunks:
                if first:
                    await send_served_by(context, served)
                yield stream_response(chunk, served, first)
                first = False
