"""Image generation: `client.image.generate_image(...)` and `client.image.transform_image(...)`.

Both stream: a `progress` message per denoising step (with a preview PNG when asked),
then one `image` message per image (PNG bytes), then `result` (usage, served_by).

    for event in client.image.generate_image("tiny-sd", "a lighthouse at dusk", seed=7):
        if event.HasField("image"):
            Path(f"out{event.image.index}.png").write_bytes(event.image.png)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

from ..image.v1 import image_generation_pb2 as pb
from ..image.v1 import image_generation_pb2_grpc as pb_grpc
from .transport import AsyncTransport, Transport

M = TypeVar("M", pb.GenerateImageRequest, pb.TransformImageRequest)


def _build(message: type[M], **fields: object) -> M:
    """`message` with every field that is not None: unset optionals take the model's defaults."""
    return message(**{name: value for name, value in fields.items() if value is not None})


class ImageClient:
    """Blocking image generation. Breaking out of a stream cancels the generation on the server."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._stub = pb_grpc.ImageGenerationServiceStub(transport.channel)

    def generate_image(self, model: str, prompt: str, *, negative_prompt: str = "",
                       width: int | None = None, height: int | None = None, steps: int | None = None,
                       guidance_scale: float | None = None, seed: int | None = None,
                       num_images: int | None = None, previews: bool = False,
                       model_version: str = "", timeout: float | None = None
                       ) -> Iterator[pb.GenerateImageResponse]:
        """Text-to-image. Unset size, steps and guidance take the model's defaults; the same
        seed and parameters give the same PNG bytes."""
        request = _build(pb.GenerateImageRequest, model=model, model_version=model_version,
                         prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                         steps=steps, guidance_scale=guidance_scale, seed=seed,
                         num_images=num_images, previews=previews)
        return self._t.stream(self._stub.GenerateImage, request, model=model, timeout=timeout)

    def transform_image(self, model: str, image: bytes, prompt: str, *, negative_prompt: str = "",
                        strength: float | None = None, steps: int | None = None,
                        guidance_scale: float | None = None, seed: int | None = None,
                        num_images: int | None = None, previews: bool = False,
                        model_version: str = "", timeout: float | None = None
                        ) -> Iterator[pb.TransformImageResponse]:
        """Image-to-image from PNG, JPEG or WebP bytes. About steps x strength steps run; the
        output has the input's size (cropped to a multiple of 8)."""
        request = _build(pb.TransformImageRequest, model=model, model_version=model_version,
                         image=image, prompt=prompt, negative_prompt=negative_prompt,
                         strength=strength, steps=steps, guidance_scale=guidance_scale, seed=seed,
                         num_images=num_images, previews=previews)
        return self._t.stream(self._stub.TransformImage, request, model=model, timeout=timeout)


class AsyncImageClient:
    """Async image generation (same methods as ImageClient, as async iterators)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport
        self._stub = pb_grpc.ImageGenerationServiceStub(transport.channel)

    def generate_image(self, model: str, prompt: str, *, negative_prompt: str = "",
                       width: int | None = None, height: int | None = None, steps: int | None = None,
                       guidance_scale: float | None = None, seed: int | None = None,
                       num_images: int | None = None, previews: bool = False,
                       model_version: str = "", timeout: float | None = None
                       ) -> AsyncIterator[pb.GenerateImageResponse]:
        request = _build(pb.GenerateImageRequest, model=model, model_version=model_version,
                         prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                         steps=steps, guidance_scale=guidance_scale, seed=seed,
                         num_images=num_images, previews=previews)
        return self._t.stream(self._stub.GenerateImage, request, model=model, timeout=timeout)

    def transform_image(self, model: str, image: bytes, prompt: str, *, negative_prompt: str = "",
                        strength: float | None = None, steps: int | None = None,
                        guidance_scale: float | None = None, seed: int | None = None,
                        num_images: int | None = None, previews: bool = False,
                        model_version: str = "", timeout: float | None = None
                        ) -> AsyncIterator[pb.TransformImageResponse]:
        request = _build(pb.TransformImageRequest, model=model, model_version=model_version,
                         image=image, prompt=prompt, negative_prompt=negative_prompt,
                         strength=strength, steps=steps, guidance_scale=guidance_scale, seed=seed,
                         num_images=num_images, previews=previews)
        return self._t.stream(self._stub.TransformImage, request, model=model, timeout=timeout)
