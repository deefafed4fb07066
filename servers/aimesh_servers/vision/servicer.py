"""ImageToTextService: converts requests, awaits VisionEngine's batcher, answers."""

from __future__ import annotations

import grpc
from aimesh.common.v1 import common_pb2
from aimesh.vision.v1 import image_to_text_pb2 as pb
from aimesh.vision.v1 import image_to_text_pb2_grpc as pb_grpc

from ..runtime.service import (
    EngineServicer,
    requested_model,
    resolve_model,
    send_served_by,
    served_by,
)
from .engine import DescribeRequest, VisionEngine

TASK_NAMES = {pb.TASK_CAPTION: "caption", pb.TASK_OCR: "ocr"}


def _task_name(value: int) -> str:
    """The engine's name for a Task; others keep a name the engine rejects by."""
    if value in TASK_NAMES:
        return TASK_NAMES[value]
    return pb.Task.Name(value) if value in pb.Task.values() else f"unknown task {value}"


class ImageToTextServicer(EngineServicer, pb_grpc.ImageToTextServiceServicer):
    service = pb.DESCRIPTOR.services_by_name["ImageToTextService"]
    register = staticmethod(pb_grpc.add_ImageToTextServiceServicer_to_server)
    engine: VisionEngine

    @staticmethod
    def _request(req: pb.DescribeImageRequest) -> DescribeRequest:
        return DescribeRequest(
            image=req.image,
            tasks=tuple(_task_name(t) for t in req.tasks),
            ocr_language=req.ocr_language,
            caption_prompt=req.caption_prompt,
        )

    async def DescribeImage(
        self, request: pb.DescribeImageRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeImageResponse:
        asked = requested_model(request.model, context)
        model = resolve_model(self.models, asked, request.model_version)
        result = await self.engine.describe_batched(self._request(request))
        served = served_by(model, self.pool, asked)
        # Random weights only make the caption noise; tesseract's OCR is real.
        served.random_weights = model.random_weights and "caption" in result.tasks
        await send_served_by(context, served)
        return pb.DescribeImageResponse(
            caption=result.caption,
            text=result.text,
            words=[
                pb.Word(text=w.text, box=pb.BoundingBox(x=w.box[0], y=w.box[1], width=w.box[2],
                                                         height=w.box[3]), confidence=w.confidence)
                for w in result.words
            ],
            usage=common_pb2.Usage(unit="images", input_units=1),
            served_by=served,
        )
