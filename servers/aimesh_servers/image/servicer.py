"""ImageGenerationService: converts requests, calls ImageEngine, streams progress and images."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from aimesh.common.v1 import common_pb2
from aimesh.image.v1 import image_generation_pb2 as pb
from aimesh.image.v1 import image_generation_pb2_grpc as pb_grpc

from ..runtime import tracing
from ..runtime.service import (
    EngineServicer,
    requested_model,
    resolve_model,
    send_served_by,
    served_by,
)
from ..runtime.streams import iterate_in_thread
from .engine import Done, FinishedImage, ImageEngine, ImageRequest, StepDone

DEFAULT_STRENGTH = 0.6
ImageCallRequest = pb.GenerateImageRequest | pb.TransformImageRequest
ImageCallResponse = pb.GenerateImageResponse | pb.TransformImageResponse


class ImageGenerationServicer(EngineServicer, pb_grpc.ImageGenerationServiceServicer):
    service = pb.DESCRIPTOR.services_by_name["ImageGenerationService"]
    register = staticmethod(pb_grpc.add_ImageGenerationServiceServicer_to_server)
    engine: ImageEngine

    @staticmethod
    def _request(req: ImageCallRequest) -> ImageRequest:
        def optional(name: str) -> object:
            return getattr(req, name) if req.HasField(name) else None

        common = dict(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            steps=optional("steps"),
            guidance_scale=optional("guidance_scale"),
            seed=optional("seed"),
            num_images=req.num_images if req.HasField("num_images") else 1,
            previews=req.previews,
        )
        if isinstance(req, pb.TransformImageRequest):
            strength = req.strength if req.HasField("strength") else DEFAULT_STRENGTH
            return ImageRequest(**common, image=req.image, strength=strength)
        return ImageRequest(**common, width=optional("width"), height=optional("height"))

    async def _stream(
        self, req: ImageCallRequest, context: grpc.aio.ServicerContext, response: type[ImageCallResponse]
    ) -> AsyncIterator[ImageCallResponse]:
        asked = requested_model(req.model, context)
        model = resolve_model(self.models, asked, req.model_version)
        # Fail before any header is sent; decoding the input image stays off the loop.
        job = await asyncio.to_thread(self.engine.prepare, self._request(req))
        served = served_by(model, self.pool, asked)
        await send_served_by(context, served)
        with tracing.stage("image.diffusion") as stage:
            async for event in iterate_in_thread(lambda cancel: self.engine.stream(job, cancel)):
                if isinstance(event, StepDone):
                    stage.set(steps_done=event.step, total_steps=event.total_steps)
                    yield response(progress=pb.Progress(
                        step=event.step, total_steps=event.total_steps, preview_png=event.preview_png
                    ))
                elif isinstance(event, FinishedImage):
                    yield response(image=pb.GeneratedImage(
                        png=event.png, width=event.width, height=event.height, seed=event.seed,
                        index=event.index,
                    ))
                elif isinstance(event, Done):
                    usage = common_pb2.Usage(unit="image_steps", output_units=event.images * event.steps)
                    yield response(result=pb.ImageResult(usage=usage, served_by=served))

    async def GenerateImage(
        self, request: pb.GenerateImageRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateImageResponse]:
        async for response in self._stream(request, context, pb.GenerateImageResponse):
            yield response

    async def TransformImage(
        self, request: pb.TransformImageRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TransformImageResponse]:
        async for response in self._stream(request, context, pb.TransformImageResponse):
            yield response
