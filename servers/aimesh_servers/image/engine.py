"""Image generation and image-to-image on diffusers, with no gRPC in sight.

`ImageEngine.prepare` checks a request and resolves every default (size, steps,
guidance, seeds; the input image is decoded here), raising domain errors; then
`ImageEngine.stream` runs the pipeline in a worker thread and yields a `StepDone` per
denoising step (from `callback_on_step_end`), then each `FinishedImage`, then `Done`.
The step callback checks a cancel event and raises, which ends the denoising loop
itself (and skips the VAE decode) when the caller goes away.

One runner thread makes every pipeline call (a pipeline object and its scheduler hold
per-call state): requests of the same shape (kind, size, steps, guidance, strength) that
wait together run as one batch of up to `max_batch` images, each image with its own
prompt and seed generator; a request joins within `batch_wait_s` of the first. On this
CPU a batch of 4 same-shape images took 1/4.1 of the time of 4 single runs at 64x64 and
1/1.8 at 256x256 (tiny-sd, 10 steps). A cancelled request leaves its batch at the next
step; the batch stops only when every request in it has left. `capacity` (the server's
admission slots) is `max_batch` requests: the server's queue holds the rest.
"""

from __future__ import annotations

import inspect
import io
import queue
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline
from PIL import Image, ImageOps

from ..models import builtin
from ..runtime.errors import InvalidArgument, OutOfRange, UnsupportedMedia, media_detail

INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
_CANCEL_POLL_S = 0.05  # how often a waiting request looks whether its caller left
SEED_SPACE = 2**63  # seeds are int64 on the wire; image i of a request uses seed + i
# Linear map from Stable Diffusion's 4 latent channels to RGB: the usual cheap
# approximation of its VAE decoder, good enough for a progress preview.
_LATENT_RGB = torch.tensor([
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
])


@dataclass(frozen=True)
class ImageRequest:
    """Text-to-image, or image-to-image when `image` is given (width/height then come from it)."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    previews: bool = False
    image: bytes | None = None
    strength: float = 0.6


@dataclass
class EngineLimits:
    min_side: int = 64
    max_side: int = 2048
    max_pixels: int = 4 * 1024 * 1024  # width x height x num_images
    max_steps: int = 150
    max_guidance: float = 30.0
    max_images: int = 4
    max_prompt_chars: int = 2000
    max_image_bytes: int = 32 * 1024 * 1024


@dataclass(frozen=True)
class Job:
    """A checked request with every default resolved, ready for `stream`."""

    image_to_image: bool
    seeds: tuple[int, ...]
    previews: bool
    kwargs: dict[str, Any]  # pipeline arguments, except generator and callback
    shape: tuple[Any, ...]  # requests of one shape can share a pipeline call


@dataclass(frozen=True)
class StepDone:
    step: int  # 1..total_steps
    total_steps: int
    preview_png: bytes = b""


@dataclass(frozen=True)
class FinishedImage:
    png: bytes
    width: int
    height: int
    seed: int
    index: int


@dataclass(frozen=True)
class Done:
    images: int
    steps: int  # denoising steps actually run


class _Stop(Exception):
    """Raised inside the pipeline's step callback to end the denoising loop."""


@dataclass
class ImageEngine:
    source: str
    limits: EngineLimits = field(default_factory=EngineLimits)
    threads: int = 2
    max_batch: int = 4  # images per pipeline call
    batch_wait_s: float = 0.02  # how long a batch waits for same-shape requests to join
    # Denoising steps run over the engine's life: observable proof that work stops on cancel.
    steps_run: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)  # images per call -> calls

    @property
    def capacity(self) -> int:
        """Requests admitted at once (the server's slots): enough to fill a batch."""
        return self.max_batch

    def load(self) -> None:
        torch.set_num_threads(self.threads)
        device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)
        self.text2img = AutoPipelineForText2Image.from_pretrained(builtin.resolve(self.source), dtype=dtype)
        self.text2img.to(device)
        if "callback_on_step_end" not in inspect.signature(self.text2img.__call__).parameters:
            raise ValueError(f"{type(self.text2img).__name__} reports no per-step progress")
        try:  # shares the loaded modules; not every family has an image-to-image pipeline
            self.img2img: DiffusionPipeline | None = AutoPipelineForImage2Image.from_pipe(self.text2img)
        except ValueError:
            self.img2img = None
        for pipe in (self.text2img, self.img2img):
            if pipe is not None:
                pipe.set_progress_bar_config(disable=True)
        defaults = inspect.signature(self.text2img.__call__).parameters
        self.default_steps = int(defaults["num_inference_steps"].default)
        self.default_guidance = float(defaults["guidance_scale"].default)
        sample = getattr(self.text2img, "default_sample_size", None) or self.text2img.unet.config.sample_size
        self.default_side = int(sample * self.text2img.vae_scale_factor)
        self._count_lock = threading.Lock()
        self._pending: deque[_Work] = deque()
        self._wakeup = threading.Condition()
        threading.Thread(target=self._run_batches, name="diffusion", daemon=True).start()

    def prepare(self, request: ImageRequest) -> Job:
        """Checks `request` (raising InvalidArgument, OutOfRange or UnsupportedMedia) and
        resolves its defaults. Decodes the input image, so call it off the event loop."""
        lim = self.limits
        for name in ("prompt", "negative_prompt"):
            if len(getattr(request, name)) > lim.max_prompt_chars:
                raise OutOfRange(f"{name} is longer than {lim.max_prompt_chars} characters", field=name)
        if not request.prompt.strip():
            raise InvalidArgument("prompt is required", field="prompt")
        if not 1 <= request.num_images <= lim.max_images:
            raise OutOfRange(
                f"num_images must be between 1 and {lim.max_images}, got {request.num_images}",
                field="num_images",
            )
        steps = self.default_steps if request.steps is None else request.steps
        if not 1 <= steps <= lim.max_steps:
            raise OutOfRange(f"steps must be between 1 and {lim.max_steps}, got {steps}", field="steps")
        guidance = self.default_guidance if request.guidance_scale is None else request.guidance_scale
        if not 0.0 <= guidance <= lim.max_guidance:
            raise OutOfRange(
                f"guidance_scale must be in [0, {lim.max_guidance:g}], got {guidance}", field="guidance_scale"
            )
        if request.seed is not None and not 0 <= request.seed < SEED_SPACE:
            raise OutOfRange(f"seed must be in [0, 2^63), got {request.seed}", field="seed")
        seed = secrets.randbelow(2**32) if request.seed is None else request.seed
        kwargs: dict[str, Any] = dict(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=request.num_images,
        )
        if request.image is None:
            width = self._side(request.width, "width")
            height = self._side(request.height, "height")
            self._check_budget(width, height, request.num_images, "width")
            kwargs.update(width=width, height=height)
        else:
            if self.img2img is None:
                raise InvalidArgument(
                    f"{type(self.text2img).__name__} has no image-to-image pipeline", field="model"
                )
            if not 0.0 < request.strength <= 1.0:
                raise OutOfRange(f"strength must be in (0, 1], got {request.strength}", field="strength")
            if int(steps * request.strength) < 1:  # diffusers runs int(steps x strength) steps
                raise OutOfRange(
                    f"strength {request.strength:g} x steps {steps} leaves no denoising step; "
                    "raise one of them",
                    field="strength",
                )
            kwargs.update(image=self._decode(request.image, request.num_images), strength=request.strength)
        size = kwargs["image"].size if request.image is not None else (kwargs["width"], kwargs["height"])
        return Job(
            image_to_image=request.image is not None,
            seeds=tuple((seed + i) % SEED_SPACE for i in range(request.num_images)),
            previews=request.previews,
            kwargs=kwargs,
            shape=(request.image is not None, size, steps, guidance, kwargs.get("strength")),
        )

    def _side(self, value: int | None, name: str) -> int:
        if value is None:
            return self.default_side
        if not self.limits.min_side <= value <= self.limits.max_side:
            raise OutOfRange(
                f"{name} must be between {self.limits.min_side} and {self.limits.max_side} pixels, "
                f"got {value}",
                field=name,
            )
        if value % 8:
            raise InvalidArgument(f"{name} must be a multiple of 8, got {value}", field=name)
        return value

    def _check_budget(self, width: int, height: int, num_images: int, size_field: str) -> None:
        budget = self.limits.max_pixels
        if width * height * num_images > budget:
            raise OutOfRange(
                f"{num_images} image(s) of {width}x{height} exceed the budget of {budget} pixels "
                "per request",
                field="num_images" if width * height <= budget else size_field,
            )

    def _decode(self, data: bytes, num_images: int) -> Image.Image:
        """The input image as RGB, cropped to a multiple of 8 on each side."""
        lim = self.limits
        if not data:
            raise InvalidArgument("image is required", field="image")
        if len(data) > lim.max_image_bytes:
            raise OutOfRange(f"image is larger than {lim.max_image_bytes} bytes", field="image")
        try:
            image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
        except (OSError, SyntaxError, ValueError) as exc:
            raise UnsupportedMedia(
                f"image is not a readable PNG, JPEG or WebP file{media_detail(exc)}", field="image"
            ) from exc
        except Image.DecompressionBombError as exc:
            raise OutOfRange(f"image is too large: {exc}", field="image") from exc
        width, height = image.size  # from the header: check before decoding any pixels
        if not (lim.min_side <= width <= lim.max_side and lim.min_side <= height <= lim.max_side):
            raise OutOfRange(
                f"image is {width}x{height}; each side must be between {lim.min_side} and "
                f"{lim.max_side} pixels",
                field="image",
            )
        self._check_budget(width, height, num_images, "image")
        try:
            image.load()
            image = ImageOps.exif_transpose(image).convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt pixel data
            raise UnsupportedMedia(f"image data is corrupt or truncated: {exc}", field="image") from exc
        return image.crop((0, 0, image.width - image.width % 8, image.height - image.height % 8))

    def stream(self, job: Job, cancel: threading.Event) -> Iterator[StepDone | FinishedImage | Done]:
        """Yields progress per denoising step, then the images, then Done. Ends early,
        without images, once `cancel` is set. Runs in the next batch of its shape."""
        work = _Work(job, cancel)
        with self._wakeup:
            self._pending.append(work)
            self._wakeup.notify()
        try:
            while True:
                try:
                    event = work.events.get(timeout=_CANCEL_POLL_S)
                except queue.Empty:
                    if cancel.is_set():
                        return
                    continue
                if not isinstance(event, StepDone):
                    break
                yield event
            if isinstance(event, BaseException):
                raise event
            if event is None:
                return
            for index, (image, seed) in enumerate(zip(event, job.seeds, strict=True)):
                yield FinishedImage(_png(image), image.width, image.height, seed, index)
            yield Done(images=len(event), steps=work.steps)
        finally:
            cancel.set()  # also when the consumer stops early: leave the batch
            with self._wakeup:
                if work in self._pending:  # never started
                    self._pending.remove(work)
                    work.released.set()
            work.released.wait()  # the runner took it out of the pipeline

    def _run_batches(self) -> None:
        """The runner thread: one pipeline call at a time, for every waiting request of the
        first one's shape (up to `max_batch` images), after a short join window."""
        while True:
            batch = self._next_batch()
            if not batch:  # its first request left during the join window
                continue
            try:
                self._run(batch)
            except BaseException as exc:  # noqa: BLE001 - each caller gets it
                for work in batch:
                    work.finish(exc)

    def _next_batch(self) -> list[_Work]:
        with self._wakeup:
            while not self._pending:
                self._wakeup.wait()
            first = self._pending[0]
            join_until = first.arrived + self.batch_wait_s
            while (remaining := join_until - time.monotonic()) > 0 and (
                    self._images_like(first) < self.max_batch):
                self._wakeup.wait(remaining)
            batch, images = [], 0
            for work in list(self._pending):
                size = len(work.job.seeds)
                if work.job.shape == first.job.shape and (not batch or images + size <= self.max_batch):
                    self._pending.remove(work)
                    batch.append(work)
                    images += size
            return batch

    def _images_like(self, first: _Work) -> int:
        return sum(len(w.job.seeds) for w in self._pending if w.job.shape == first.job.shape)

    def _run(self, batch: list[_Work]) -> None:
        first = batch[0].job
        pipe = self.img2img if first.image_to_image else self.text2img
        rows = [(work, seed) for work in batch for seed in work.job.seeds]  # one per image
        kwargs = {k: v for k, v in first.kwargs.items()
                  if k not in ("prompt", "negative_prompt", "image", "num_images_per_prompt")}
        kwargs["prompt"] = [work.job.kwargs["prompt"] for work, _ in rows]
        negatives = [work.job.kwargs["negative_prompt"] for work, _ in rows]
        if any(negatives):  # the pipeline's own default for none is the empty prompt
            kwargs["negative_prompt"] = [n or "" for n in negatives]
        if first.image_to_image:
            kwargs["image"] = [work.job.kwargs["image"] for work, _ in rows]
        first_row = {id(work): next(i for i, (w, _) in enumerate(rows) if w is work) for work in batch}
        self.batch_sizes[len(rows)] += 1

        def on_step(pipeline: DiffusionPipeline, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            with self._count_lock:
                self.steps_run += 1
            live = [work for work in batch if not work.released.is_set()]
            for work in live:
                if work.cancel.is_set():
                    work.finish(None)  # leaves; the batch goes on for the others
            live = [work for work in live if not work.released.is_set()]
            if not live:
                raise _Stop
            for work in live:
                work.steps += 1
                preview = b""
                if work.job.previews:
                    row = first_row[id(work)]
                    preview = _preview_png(tensors["latents"][row:row + 1])
                work.events.put(StepDone(i + 1, pipeline.num_timesteps, preview))
            return {}

        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in rows]
        try:
            out = pipe(**kwargs, num_images_per_prompt=1, generator=generators,
                       callback_on_step_end=on_step, output_type="pil")
        except _Stop:
            return
        for work in batch:
            if not work.released.is_set():
                row = first_row[id(work)]
                work.finish(out.images[row:row + len(work.job.seeds)])


@dataclass(eq=False)
class _Work:
    """A request in the engine: waiting for its batch, then in the pipeline."""

    job: Job
    cancel: threading.Event
    arrived: float = field(default_factory=time.monotonic)
    events: queue.Queue[StepDone | list[Image.Image] | BaseException | None] = field(
        default_factory=queue.Queue)
    released: threading.Event = field(default_factory=threading.Event)  # out of the pipeline
    steps: int = 0

    def finish(self, outcome: list[Image.Image] | BaseException | None) -> None:
        """Images, an error, or None (stopped early); then it no longer takes part."""
        self.events.put(outcome)
        self.released.set()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _preview_png(latents: torch.Tensor) -> bytes:
    """The first image's latents as a small RGB PNG (one pixel per latent cell)."""
    if latents.ndim != 4:  # packed sequence latents (e.g. Flux): no spatial layout to show
        return b""
    x = latents[0].detach().float().cpu()
    if x.shape[0] == 4:
        rgb = torch.einsum("chw,cr->rhw", x, _LATENT_RGB)
    else:  # another latent space: a grey level per cell
        rgb = x.mean(0, keepdim=True).expand(3, -1, -1)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return _png(Image.fromarray(pixels))
