"""VisionEngine: real tesseract OCR on printed text, the real BLIP classes on the tiny
random-weight checkpoint, and the image checks."""

from __future__ import annotations

import threading

import pytest
from aimesh_servers.runtime.errors import InvalidArgument, OutOfRange, UnsupportedMedia
from aimesh_servers.vision.engine import DescribeRequest, VisionEngine, VisionLimits
from transformers import BlipForConditionalGeneration

from tests.images import LINES, encode, png_claiming, text_image

TEXT = "\n".join(LINES)


@pytest.fixture(scope="module")
def engine() -> VisionEngine:
    engine = VisionEngine("builtin:tiny-blip", limits=VisionLimits(max_caption_tokens=12))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def ocr_only() -> VisionEngine:
    engine = VisionEngine(None, limits=VisionLimits(max_pixels=100_000, max_image_bytes=200_000))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def printed() -> tuple[bytes, dict[str, tuple[int, int, int, int]]]:
    image, boxes = text_image()
    return encode(image, "PNG"), boxes


def test_ocr_reads_printed_text_with_word_boxes_and_confidence(engine, printed):
    png, drawn = printed
    result = engine.describe(DescribeRequest(png, tasks=("ocr",)))
    assert result.tasks == ("ocr",) and result.caption == ""
    assert result.text == TEXT
    assert [w.text for w in result.words] == TEXT.split()
    for word in result.words:
        x0, y0, x1, y1 = drawn[word.text]
        x, y, width, height = word.box
        assert abs(x - x0) <= 4 and abs(x + width - x1) <= 4, (word, drawn[word.text])
        assert abs(y - y0) <= 4 and abs(y + height - y1) <= 4, (word, drawn[word.text])
        assert 0.8 < word.confidence <= 1.0


@pytest.mark.parametrize(("fmt", "options"), [
    ("JPEG", {"quality": 95}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}),
])
def test_every_contract_format_decodes(ocr_only, fmt, options):
    image, _ = text_image()
    result = ocr_only.describe(DescribeRequest(encode(image.resize((320, 75)), fmt, **options)))
    assert result.tasks == ("ocr",)
    assert "aimesh" in result.text


def test_transparent_background_reads_as_white(engine):
    image, _ = text_image("RGBA")
    result = engine.describe(DescribeRequest(encode(image, "PNG"), tasks=("ocr",)))
    assert result.text == TEXT


def test_caption_runs_the_real_blip_classes_on_the_tiny_checkpoint(engine, printed):
    assert isinstance(engine.model, BlipForConditionalGeneration)
    png, _ = printed
    first = engine.describe(DescribeRequest(png, tasks=("caption",)))
    assert first.tasks == ("caption",) and first.words == [] and first.text == ""
    assert first.caption.strip(), "random weights still decode to tokens"
    assert engine.describe(DescribeRequest(png, tasks=("caption",))).caption == first.caption
    prompted = engine.describe(DescribeRequest(png, tasks=("caption",), caption_prompt="a photo of"))
    assert prompted.caption.startswith("a photo of")  # BLIP continues the prompt


def test_no_tasks_means_all_the_model_does(engine, ocr_only, printed):
    png, _ = printed
    both = engine.describe(DescribeRequest(png))
    assert both.tasks == ("caption", "ocr") and both.caption and both.text == TEXT
    assert ocr_only.describe(DescribeRequest(png)).tasks == ("ocr",)


def test_cancel_stops_captioning_after_its_current_token(engine, printed):
    png, _ = printed
    whole = engine.describe(DescribeRequest(png, tasks=("caption",))).caption
    cancel = threading.Event()
    cancel.set()
    cut = engine.describe(DescribeRequest(png, tasks=("caption",)), cancel).caption
    assert len(engine.processor.tokenizer(cut)["input_ids"]) < len(engine.processor.tokenizer(whole)["input_ids"])


def _truncated_png() -> bytes:
    image, _ = text_image()
    png = encode(image, "PNG")
    return png[: len(png) // 2]


@pytest.mark.parametrize(("request_", "error", "field"), [
    (DescribeRequest(b""), InvalidArgument, "image"),
    (DescribeRequest(b"not an image at all"), UnsupportedMedia, "image"),
    (DescribeRequest(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), UnsupportedMedia, "image"),
    (DescribeRequest(_truncated_png()), UnsupportedMedia, "image"),
    (DescribeRequest(encode(text_image()[0], "GIF")), UnsupportedMedia, "image"),
    (DescribeRequest(png_claiming(1000, 1000)), OutOfRange, "image"),
    (DescribeRequest(b"\x00" * 200_001), OutOfRange, "image"),
    (DescribeRequest(encode(text_image()[0], "PNG"), ocr_language="xyz"), InvalidArgument, "ocr_language"),
    (DescribeRequest(encode(text_image()[0], "PNG"), ocr_language="eng+"), InvalidArgument, "ocr_language"),
    (DescribeRequest(encode(text_image()[0], "PNG"), tasks=("caption",)), InvalidArgument, "tasks"),
    (DescribeRequest(encode(text_image()[0], "PNG"), tasks=("TASK_UNSPECIFIED",)), InvalidArgument, "tasks"),
])
def test_bad_input_is_refused_with_its_field(ocr_only, request_, error, field):
    with pytest.raises(error) as caught:
        ocr_only.describe(request_)
    assert type(caught.value) is error and caught.value.field == field


def test_caption_prompt_length_is_limited(engine, printed):
    png, _ = printed
    with pytest.raises(OutOfRange) as caught:
        engine.validate(DescribeRequest(png, caption_prompt="a" * 501))
    assert caught.value.field == "caption_prompt"


def test_installed_languages_exclude_orientation_data(ocr_only):
    assert "eng" in ocr_only.ocr_languages and "osd" not in ocr_only.ocr_languages


def test_a_batch_captions_like_each_image_alone_and_cancel_stops_only_its_row(engine):
    images = [text_image()[0].rotate(angle, fillcolor="white") for angle in (0, 5, 10)]
    alone = [engine._captions([image], "", [threading.Event()])[0] for image in images]
    assert engine._captions(images, "", [threading.Event() for _ in images]) == alone
    cancels = [threading.Event() for _ in images]
    cancels[1].set()
    cut = engine._captions(images, "", cancels)
    assert cut[0] == alone[0] and cut[2] == alone[2]
    tokens = engine.processor.tokenizer
    assert len(tokens(cut[1])["input_ids"]) < len(tokens(alone[1])["input_ids"])
