"""ImageToTextService over a real in-process grpc.aio server: real tesseract OCR and
the tiny random-weight BLIP, through the SDK (async and sync), alone and with concurrent
callers sharing batches."""

from __future__ import annotations

import asyncio

import aimesh
import grpc
import pytest
from aimesh.vision.v1 import image_to_text_pb2 as pb
from aimesh.vision.v1 import image_to_text_pb2_grpc as pb_grpc
from aimesh_servers import vision
from aimesh_servers.runtime.batching import BatchSettings
from aimesh_servers.vision.engine import DescribeRequest, VisionEngine
from aimesh_servers.vision.servicer import ImageToTextServicer
from PIL import Image, ImageDraw, ImageFont

from tests.images import FONT, LINES, encode, png_claiming, text_image
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


# Dynamic batching: batches of 8 images, and a long wait for a batch to fill, so that
# concurrent callers surely share one and a lone call surely waits.
BATCH = 8


def numbered(i: int) -> bytes:
    """A PNG with its own printed text, so each caller can tell its answer from others'."""
    image = Image.new("RGB", (360, 80), "white")
    ImageDraw.Draw(image).text((20, 20), f"Caller {i} page", fill="black", font=ImageFont.truetype(FONT, 32))
    return encode(image, "PNG")


@pytest.fixture(scope="module")
async def batched():
    engine = VisionEngine(vision.DEFAULT_MODEL.source, batching=BatchSettings(max_items=BATCH, max_wait_ms=10_000))
    servicer = ImageToTextServicer(vision.DEFAULT_MODEL, engine, "local")
    async with in_process_server([servicer]) as (server, _):  # slots: engine.capacity
        client = aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1)
        yield engine, server, client
        await client.close()
    engine.batcher.close()


async def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_concurrent_callers_share_batches_and_each_gets_its_own_answer(batched):
    engine, server, client = batched
    images = [numbered(i) for i in range(BATCH)]
    prompts = ["", "a picture of"]  # two prompts: two generate calls in one batch
    alone = [engine.describe(DescribeRequest(png, tasks=("caption",), caption_prompt=prompts[i % 2])).caption
             for i, png in enumerate(images)]
    before = engine.batcher.stats.batches
    outs = await asyncio.gather(*(
        client.vision.describe_image(MODEL, png, tasks=["caption", "ocr"], caption_prompt=prompts[i % 2])
        for i, png in enumerate(images)))
    for i, out in enumerate(outs):
        assert out.text == f"Caller {i} page", (i, out.text)
        assert out.caption == alone[i], i
    ran = engine.batcher.stats.batches - before
    assert ran < BATCH and engine.batcher.stats.largest > 1, f"{BATCH} calls ran in {ran} batches"
    assert server.limit.in_flight == 0


async def test_a_bad_image_fails_only_its_caller(batched):
    _, server, client = batched
    images = [numbered(i) for i in range(BATCH)]
    images[3] = images[3][: len(images[3]) // 2]  # truncated: fails decoding, inside the batch
    outs = await asyncio.gather(*(client.vision.describe_image(MODEL, png, tasks=["ocr"]) for png in images),
                                return_exceptions=True)
    assert isinstance(outs[3], aimesh.AimeshError) and outs[3].reason == "UNSUPPORTED_MEDIA"
    assert outs[3].metadata["field"] == "image"
    assert [out.text for i, out in enumerate(outs) if i != 3] == [f"Caller {i} page" for i in range(BATCH) if i != 3]
    assert server.limit.in_flight == 0


async def test_a_cancelled_call_is_dropped_before_its_batch_runs(batched, printed):
    engine, server, _ = batched
    dropped, batches = engine.batcher.stats.dropped, engine.batcher.stats.batches
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = pb_grpc.ImageToTextServiceStub(channel).DescribeImage(
            pb.DescribeImageRequest(model=MODEL, image=printed), timeout=60)
        await wait_for(lambda: engine.batcher.waiting == 1, "the call to wait for its batch")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_for(lambda: server.limit.in_flight == 0, "the slot to be released")
    await wait_for(lambda: engine.batcher.waiting == 0, "the cancelled call to leave the queue")
    assert engine.batcher.stats.dropped == dropped + 1 and engine.batcher.stats.batches == batches
