"""Image-to-text with no gRPC in sight: captions on transformers, OCR on tesseract.

Captioning takes any image-to-text checkpoint `AutoModelForImageTextToText` loads
(BLIP, BLIP-2, GIT, ...); OCR runs the tesseract binary through pytesseract, whose
`image_to_data` gives words, boxes and confidences. One request may ask for both.
Images are decoded by Pillow, restricted to the formats the contract names.
Concurrent calls share one worker (`describe_batched`, see runtime.batching): their
captions run as one `generate` per prompt, their OCR on a small pool of tesseract runs.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pytesseract
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

from ..models import builtin
from ..runtime.batching import BatchSettings, DynamicBatcher, Work
from ..runtime.errors import InvalidArgument, OutOfRange, UnsupportedMedia, media_detail

TASKS = ("caption", "ocr")
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
DEFAULT_OCR_LANGUAGE = "eng"


@dataclass(frozen=True)
class DescribeRequest:
    image: bytes
    tasks: tuple[str, ...] = ()  # of TASKS; empty: every task the engine supports
    ocr_language: str = ""  # tesseract codes joined by "+"; empty: DEFAULT_OCR_LANGUAGE
    caption_prompt: str = ""


@dataclass(frozen=True)
class OcrWord:
    text: str
    box: tuple[int, int, int, int]  # x, y, width, height in pixels
    confidence: float  # 0..1


@dataclass
class Description:
    tasks: tuple[str, ...]  # the tasks that ran
    caption: str = ""
    text: str = ""  # OCR lines, newline-separated
    words: list[OcrWord] = field(default_factory=list)


@dataclass
class VisionLimits:
    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 25_000_000
    max_prompt_chars: int = 500
    max_caption_tokens: int = 40
    ocr_timeout_s: float = 120.0


class _UntilCancelled(StoppingCriteria):
    """Ends a row of `generate` after its current token once its caller went away."""

    def __init__(self, cancels: Sequence[threading.Event]) -> None:
        self.cancels = cancels

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return torch.tensor([cancel.is_set() for cancel in self.cancels], dtype=torch.bool)


@dataclass
class VisionEngine:
    caption_source: str | None  # None: OCR only
    limits: VisionLimits = field(default_factory=VisionLimits)
    ocr_threads: int = 2  # tesseract runs at once
    batching: BatchSettings = field(default_factory=BatchSettings)

    @property
    def capacity(self) -> int:
        """Calls that may be admitted at once: enough to fill a batch while another runs."""
        return self.batching.admitted

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return TASKS if self.caption_source else ("ocr",)

    def load(self) -> None:
        # Fails here, before SERVING, when the tesseract binary is missing.
        self.ocr_languages = frozenset(pytesseract.get_languages(config="")) - {"osd"}
        if self.caption_source:
            torch.set_num_threads(self.batching.torch_threads)
            path = builtin.resolve(self.caption_source)
            self.processor = AutoProcessor.from_pretrained(path)
            self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
            self.model.eval()
        # Fast tokenizers keep padding state: concurrent calls may not share one.
        self._processor_lock = threading.Lock()
        # tesseract runs as a subprocess: a batch's OCR runs beside its captions.
        self._ocr_runs = ThreadPoolExecutor(max_workers=self.ocr_threads, thread_name_prefix="ocr")
        self.batcher: DynamicBatcher[DescribeRequest, Description] = DynamicBatcher(
            self._describe_batch, self.batching, name="vision-batcher")

    def validate(self, request: DescribeRequest) -> tuple[str, ...]:
        """Checks that need no decoding; returns the tasks to run."""
        unknown = [t for t in request.tasks if t not in TASKS]
        if unknown:
            raise InvalidArgument(
                f"tasks must be among {', '.join(TASKS)}; got {', '.join(unknown)}", field="tasks"
            )
        tasks = tuple(t for t in TASKS if t in request.tasks) or self.supported_tasks
        unsupported = [t for t in tasks if t not in self.supported_tasks]
        if unsupported:
            raise InvalidArgument(
                f"this model does not do {', '.join(unsupported)}; it does "
                f"{', '.join(self.supported_tasks)}", field="tasks",
            )
        if not request.image:
            raise InvalidArgument("image is required", field="image")
        if len(request.image) > self.limits.max_image_bytes:
            raise OutOfRange(
                f"image is {len(request.image)} bytes; the limit is {self.limits.max_image_bytes}",
                field="image",
            )
        if "ocr" in tasks:
            self._ocr_language(request.ocr_language)
        if len(request.caption_prompt) > self.limits.max_prompt_chars:
            raise OutOfRange(
                f"caption_prompt is {len(request.caption_prompt)} characters; the limit is "
                f"{self.limits.max_prompt_chars}", field="caption_prompt",
            )
        return tasks

    def _ocr_language(self, asked: str) -> str:
        language = asked or DEFAULT_OCR_LANGUAGE
        missing = [code for code in language.split("+") if code not in self.ocr_languages]
        if missing:
            raise InvalidArgument(
                f"ocr_language {asked!r}: {', '.join(repr(c) for c in missing)} not installed; "
                f"installed: {', '.join(sorted(self.ocr_languages))} (join several with '+')",
                field="ocr_language", metadata={"available": ",".join(sorted(self.ocr_languages))},
            )
        return language

    def describe(self, request: DescribeRequest, cancel: threading.Event | None = None) -> Description:
        """Blocking, this call alone. Once `cancel` is set, captioning stops after its current token."""
        tasks = self.validate(request)
        image = decode_image(request.image, self.limits.max_pixels)
        result = Description(tasks)
        if "ocr" in tasks:
            result.text, result.words = self._ocr(image, self._ocr_language(request.ocr_language))
        if "caption" in tasks:
            [result.caption] = self._captions([image], request.caption_prompt, [cancel or threading.Event()])
        return result

    async def describe_batched(self, request: DescribeRequest) -> Description:
        """`describe`, sharing `generate` calls with concurrent callers."""
        self.validate(request)
        return await self.batcher.run(request)

    def _describe_batch(self, batch: Sequence[Work[DescribeRequest, Description]]) -> list[Description | Exception]:
        """Decode every image; OCR on the pool while captions run here, one `generate` per
        distinct prompt. An item's bad image or failed OCR fails that item alone."""
        answers: list[Description | Exception] = []
        images: dict[int, Image.Image] = {}
        ocr: dict[int, Future[tuple[str, list[OcrWord]]]] = {}
        for k, work in enumerate(batch):
            try:
                tasks = self.validate(work.item)
                images[k] = decode_image(work.item.image, self.limits.max_pixels)
                if "ocr" in tasks:
                    ocr[k] = self._ocr_runs.submit(self._ocr, images[k], self._ocr_language(work.item.ocr_language))
                answers.append(Description(tasks))
            except Exception as exc:  # noqa: BLE001 - answered to its caller alone
                answers.append(exc)
        by_prompt: dict[str, list[int]] = {}
        for k, answer in enumerate(answers):
            if isinstance(answer, Description) and "caption" in answer.tasks:
                by_prompt.setdefault(batch[k].item.caption_prompt, []).append(k)
        for prompt, rows in by_prompt.items():
            captions = self._captions([images[k] for k in rows], prompt, [batch[k].cancel for k in rows])
            for k, caption in zip(rows, captions):
                answers[k].caption = caption  # type: ignore[union-attr]
        for k, running in ocr.items():
            try:
                answers[k].text, answers[k].words = running.result()  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001
                answers[k] = exc
        return answers

    def _ocr(self, image: Image.Image, language: str) -> tuple[str, list[OcrWord]]:
        data = pytesseract.image_to_data(
            image, lang=language, output_type=pytesseract.Output.DICT, timeout=self.limits.ocr_timeout_s
        )
        lines: dict[tuple[int, int, int], list[str]] = {}
        words = []
        for i, text in enumerate(data["text"]):
            text = text.strip()
            if data["level"][i] != 5 or not text:  # level 5: a word
                continue
            line = (data["block_num"][i], data["par_num"][i], data["line_num"][i])
            lines.setdefault(line, []).append(text)
            box = (data["left"][i], data["top"][i], data["width"][i], data["height"][i])
            confidence = min(max(float(data["conf"][i]) / 100.0, 0.0), 1.0)
            words.append(OcrWord(text, box, confidence))
        return "\n".join(" ".join(line) for line in lines.values()), words

    def _captions(self, images: list[Image.Image], prompt: str, cancels: Sequence[threading.Event]) -> list[str]:
        """One greedy `generate` for images that share a prompt; a row stops early once its
        cancel is set."""
        with self._processor_lock:
            inputs = self.processor(images=images, text=[prompt] * len(images) if prompt else None,
                                    return_tensors="pt")
        with torch.inference_mode():
            ids = self.model.generate(
                **inputs, max_new_tokens=self.limits.max_caption_tokens, do_sample=False,
                stopping_criteria=StoppingCriteriaList([_UntilCancelled(cancels)]),
            )
        return [self.processor.decode(row, skip_special_tokens=True).strip() for row in ids]


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """RGB pixels of an image in one of FORMATS (the first frame of an animation)."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = image.size
    except Image.DecompressionBombError as exc:
        raise OutOfRange(f"image has too many pixels: {exc}", field="image") from exc
    except Exception as exc:  # Pillow raises many types on hostile bytes: all mean "not an image"
        raise UnsupportedMedia(
            f"image is not a readable {', '.join(FORMATS)} image{media_detail(exc)}", field="image",
            metadata={"formats": ",".join(FORMATS)},
        ) from exc
    if width * height > max_pixels:
        raise OutOfRange(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            field="image",
        )
    try:
        image.load()  # decodes every pixel: truncated data fails here
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            # Transparent pixels become white, not black: dark text stays readable.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, "white")
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as exc:
        raise UnsupportedMedia(
            f"image {image.format} data is corrupt or truncated: {exc}", field="image",
            metadata={"formats": ",".join(FORMATS)},
        ) from exc
