"""Image-to-text with no gRPC in sight: captions on transformers, OCR on tesseract.

Captioning takes any image-to-text checkpoint `AutoModelForImageTextToText` loads
(BLIP, BLIP-2, GIT, ...); OCR runs the tesseract binary through pytesseract, whose
`image_to_data` gives words, boxes and confidences. One request may ask for both.
Images are decoded by Pillow, restricted to the formats the contract names.
"""

from __future__ import annotations

import io
import threading
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
    """Ends `generate` after the current token once the caller went away."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool)


@dataclass
class VisionEngine:
    caption_source: str | None  # None: OCR only
    limits: VisionLimits = field(default_factory=VisionLimits)
    threads: int = 2

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return TASKS if self.caption_source else ("ocr",)

    def load(self) -> None:
        # Fails here, before SERVING, when the tesseract binary is missing.
        self.ocr_languages = frozenset(pytesseract.get_languages(config="")) - {"osd"}
        if self.caption_source:
            torch.set_num_threads(self.threads)
            path = builtin.resolve(self.caption_source)
            self.processor = AutoProcessor.from_pretrained(path)
            self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
            self.model.eval()
        # Fast tokenizers keep padding state: concurrent calls may not share one.
        self._processor_lock = threading.Lock()

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
        """Blocking. Once `cancel` is set, captioning stops after its current token."""
        tasks = self.validate(request)
        image = decode_image(request.image, self.limits.max_pixels)
        result = Description(tasks)
        if "ocr" in tasks:
            result.text, result.words = self._ocr(image, self._ocr_language(request.ocr_language))
        if "caption" in tasks:
            result.caption = self._caption(image, request.caption_prompt, cancel or threading.Event())
        return result

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

    def _caption(self, image: Image.Image, prompt: str, cancel: threading.Event) -> str:
        with self._processor_lock:
            inputs = self.processor(images=image, text=prompt or None, return_tensors="pt")
        with torch.inference_mode():
            ids = self.model.generate(
                **inputs, max_new_tokens=self.limits.max_caption_tokens, do_sample=False,
                stopping_criteria=StoppingCriteriaList([_UntilCancelled(cancel)]),
            )
        return self.processor.decode(ids[0], skip_special_tokens=True).strip()


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
