"""Image-to-text: `client.vision.describe_image(...)` (caption and/or OCR)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..vision.v1 import image_to_text_pb2 as pb
from ..vision.v1 import image_to_text_pb2_grpc as pb_grpc
from .transport import AsyncTransport, Transport

#: An image: its encoded bytes (PNG, JPEG, WebP, BMP, TIFF) or a path to a file.
ImageLike = bytes | str | os.PathLike
#: A task: "caption", "ocr", or a `Task` enum value.
TaskLike = str | int
_TASKS = {"caption": pb.TASK_CAPTION, "ocr": pb.TASK_OCR}


def _request(model: str, image: ImageLike, tasks: Sequence[TaskLike], ocr_language: str,
             caption_prompt: str, model_version: str) -> pb.DescribeImageRequest:
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    values = []
    for task in tasks:
        if isinstance(task, str) and task not in _TASKS:
            raise ValueError(f"task must be one of {', '.join(_TASKS)}, got {task!r}")
        values.append(_TASKS[task] if isinstance(task, str) else task)
    return pb.DescribeImageRequest(model=model, model_version=model_version, image=data, tasks=values,
                                   ocr_language=ocr_language, caption_prompt=caption_prompt)


class VisionClient:
    """Blocking image-to-text."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._stub = pb_grpc.ImageToTextServiceStub(transport.channel)

    def describe_image(self, model: str, image: ImageLike, *, tasks: Sequence[TaskLike] = (),
                       ocr_language: str = "", caption_prompt: str = "", model_version: str = "",
                       timeout: float | None = None) -> pb.DescribeImageResponse:
        """`response.caption`, `.text` (OCR lines), `.words` (text, box, confidence).
        tasks: "caption", "ocr" or both; empty means all the model does.
        ocr_language: tesseract codes, e.g. "eng" or "eng+deu" (default "eng")."""
        request = _request(model, image, tasks, ocr_language, caption_prompt, model_version)
        return self._t.unary(self._stub.DescribeImage, request, model=model, timeout=timeout)


class AsyncVisionClient:
    """Awaitable image-to-text (same method as VisionClient)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport
        self._stub = pb_grpc.ImageToTextServiceStub(transport.channel)

    async def describe_image(self, model: str, image: ImageLike, *, tasks: Sequence[TaskLike] = (),
                             ocr_language: str = "", caption_prompt: str = "", model_version: str = "",
                             timeout: float | None = None) -> pb.DescribeImageResponse:
        request = _request(model, image, tasks, ocr_language, caption_prompt, model_version)
        return await self._t.unary(self._stub.DescribeImage, request, model=model, timeout=timeout)
