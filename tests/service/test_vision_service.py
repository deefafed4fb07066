"""ImageToTextService over a real in-process grpc.aio server: real tesseract OCR and
the tiny random-weight BLIP, through the SDK (async and sync)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import aimesh
from aimesh.vision.v1 import image_to_text_pb2 as pb
from aimesh.vision.v1 import image_to_text_pb2_grpc as pb_grpc
from aimesh_servers import vision
from tests.images import LINES, encode, png_claiming, text_image
from tests.servers import in_process_server

MODEL = vision.DEFAULT_MODEL.id


@pytest.fixture(scope="module")
def printed() -> bytes:
    return encode(text_image()[0], "PNG")


@pytest.fixture(scope="module")
async def served():
    servicer = vision.build(vision.DEFAULT_MODEL, vision.ServerSettings())
    async with in_process_server([servicer], max_concurrency=2) as (server, channel):
        client = aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1)
        yield server, client
        await client.close()


async def test_caption_and_ocr_in_one_call(served, printed):
    _, client = served
    out = await client.vision.describe_image(MODEL, printed, tasks=["caption", "ocr"])
    assert out.caption.strip()
    assert out.text == "\n".join(LINES)
    assert [w.text for w in out.words] == " ".join(LINES).split()
    hello = out.words[0]
    assert 15 <= hello.box.x <= 30 and 20 <= hello.box.y <= 32 and hello.box.width > 40
    assert hello.box.height > 15 and 0.8 < hello.confidence <= 1.0
    assert out.usage.unit == "images" and out.usage.input_units == 1
    assert out.served_by.model == MODEL and out.served_by.pool == "local"
    assert out.served_by.random_weights, "the caption comes from random weights"


async def test_ocr_alone_is_not_labelled_random_and_headers_say_so(served, printed):
    server, _ = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = pb_grpc.ImageToTextServiceStub(channel).DescribeImage(
            pb.DescribeImageRequest(model=MODEL, image=printed, tasks=[pb.TASK_OCR]), timeout=30)
        out = await call
        headers = dict(await call.initial_metadata())
    assert out.caption == "" and out.text.startswith("Hello aimesh")
    assert not out.served_by.random_weights
    assert headers["x-aimesh-served-model"] == MODEL and headers["x-aimesh-random-weights"] == "false"


async def test_conditional_caption_and_the_sync_client(served, printed):
    server, _ = served

    def call() -> pb.DescribeImageResponse:
        with aimesh.Client(f"127.0.0.1:{server.port}", max_attempts=1) as client:
            return client.vision.describe_image(MODEL, printed, tasks=["caption"],
                                                caption_prompt="a picture of")

    out = await asyncio.to_thread(call)
    assert out.caption.startswith("a picture of") and not out.words


def _truncated(png: bytes) -> bytes:
    return png[: len(png) // 2]


PNG = encode(text_image()[0], "PNG")


@pytest.mark.parametrize(("kwargs", "code", "reason", "field"), [
    (dict(image=b"garbage bytes"), grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_MEDIA", "image"),
    (dict(image=_truncated(PNG)), grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_MEDIA", "image"),
    (dict(image=encode(text_image()[0], "GIF")), grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_MEDIA", "image"),
    (dict(image=b""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "image"),
    (dict(image=png_claiming(6000, 6000)), grpc.StatusCode.OUT_OF_RANGE, "INVALID_FIELD", "image"),
    (dict(image=PNG, ocr_language="klingon"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "ocr_language"),
    (dict(image=PNG, tasks=[pb.TASK_UNSPECIFIED]), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "tasks"),
    (dict(image=PNG, tasks=[7]), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "tasks"),
    (dict(image=PNG, caption_prompt="x" * 501), grpc.StatusCode.OUT_OF_RANGE, "INVALID_FIELD", "caption_prompt"),
])
async def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(served, printed, kwargs, code,
                                                                         reason, field):
    server, client = served
    with pytest.raises(aimesh.AimeshError) as caught:
        await client.vision.describe_image(MODEL, **kwargs)
    assert caught.value.code == code and caught.value.reason == reason
    assert caught.value.domain == "aimesh.dev"
    assert caught.value.metadata["field"] == field and field in caught.value.field_violations
    ok = await client.vision.describe_image(MODEL, printed, tasks=["ocr"])
    assert "aimesh" in ok.text
    assert server.limit.in_flight == 0


async def test_unknown_model_is_not_found(served, printed):
    _, client = served
    with pytest.raises(aimesh.NotFoundError) as caught:
        await client.vision.describe_image("blip-9000", printed)
    assert caught.value.reason == "MODEL_NOT_FOUND" and caught.value.metadata["available"] == MODEL


def test_sdk_refuses_an_unknown_task_name_before_sending(printed):
    with aimesh.Client("127.0.0.1:1", max_attempts=1) as client:
        with pytest.raises(ValueError, match="task must be one of"):
            client.vision.describe_image(MODEL, printed, tasks=["poetry"])
