"""ImageGenerationService over a real in-process grpc.aio server with the tiny random-weight SD."""

from __future__ import annotations

import asyncio
import io
import time

import aimesh
import grpc
import pytest
from aimesh.image.v1 import image_generation_pb2 as pb
from aimesh.image.v1 import image_generation_pb2_grpc as pb_grpc
from aimesh_servers import image
from PIL import Image

from tests.servers import in_process_server, server_process

MODEL = "tiny-sd"


@pytest.fixture(scope="module")
async def served():
    servicer = image.build(image.DEFAULT_MODEL, image.ServerSettings())
    async with in_process_server([servicer], max_concurrency=2) as (server, _):
        client = aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1)
        yield servicer, server, client
        await client.close()


def encoded(fmt: str, size: tuple[int, int] = (100, 70)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 90, 200)).save(buffer, format=fmt)
    return buffer.getvalue()


def kinds(events) -> list[str]:
    return [e.WhichOneof("event") for e in events]


async def test_generate_streams_progress_then_images_then_result(served):
    _, server, client = served
    events = [e async for e in client.image.generate_image(
        MODEL, "a lighthouse at dusk", width=128, height=64, steps=4, seed=11, num_images=2)]
    assert kinds(events) == ["progress"] * 4 + ["image"] * 2 + ["result"]
    assert [(e.progress.step, e.progress.total_steps) for e in events[:4]] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(not e.progress.preview_png for e in events[:4])
    for index, event in enumerate(events[4:6]):
        decoded = Image.open(io.BytesIO(event.image.png))
        assert decoded.format == "PNG" and decoded.size == (128, 64)
        assert (event.image.width, event.image.height) == (128, 64)
        assert (event.image.index, event.image.seed) == (index, 11 + index)
    result = events[-1].result
    assert result.usage.unit == "image_steps" and result.usage.output_units == 2 * 4
    assert result.served_by.model == MODEL and result.served_by.pool == "local"
    assert result.served_by.random_weights, "responses say the weights are random"
    assert server.limit.in_flight == 0


async def test_same_seed_gives_the_same_png_bytes(served):
    _, _, client = served

    async def pngs(seed: int) -> list[bytes]:
        return [e.image.png async for e in client.image.generate_image(
            MODEL, "a red fox", negative_prompt="blur", steps=3, seed=seed, guidance_scale=6.0)
            if e.HasField("image")]

    first, again, other = await pngs(7), await pngs(7), await pngs(8)
    assert first == again and first != other


async def test_previews_when_asked(served):
    _, _, client = served
    events = [e async for e in client.image.generate_image(MODEL, "a cat", steps=2, seed=1, previews=True)]
    previews = [e.progress.preview_png for e in events if e.HasField("progress")]
    assert len(previews) == 2
    assert all(Image.open(io.BytesIO(p)).size == (8, 8) for p in previews)  # 64x64 -> 8x8 latents


async def test_served_by_headers_name_the_random_weight_model(served):
    _, server, _ = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = pb_grpc.ImageGenerationServiceStub(channel).GenerateImage(
            pb.GenerateImageRequest(model=MODEL, prompt="x", steps=1), timeout=30)
        headers = dict(await call.initial_metadata())
        assert len([e async for e in call]) == 3
    assert headers["x-aimesh-served-model"] == MODEL and headers["x-aimesh-random-weights"] == "true"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
async def test_transform_keeps_the_input_size_and_runs_steps_times_strength(served, fmt):
    _, _, client = served
    events = [e async for e in client.image.transform_image(
        MODEL, encoded(fmt), "make it red", strength=0.5, steps=8, seed=2)]
    assert kinds(events) == ["progress"] * 4 + ["image", "result"]
    assert events[3].progress.total_steps == 4
    assert Image.open(io.BytesIO(events[4].image.png)).size == (96, 64)  # 100x70 cropped to x8
    assert events[-1].result.usage.output_units == 4


async def test_cancelling_a_stream_stops_the_denoising(served):
    servicer, server, client = served
    stream = client.image.generate_image(MODEL, "a very slow one", width=256, height=256, steps=150)
    received = 0
    async for _ in stream:
        received += 1
        if received == 2:
            break
    await stream.aclose()  # cancels the RPC
    # Until the server has seen the cancellation (the step under way may still finish)...
    deadline = time.monotonic() + 60
    before = servicer.engine.steps_run
    while True:
        await asyncio.sleep(0.5)
        if servicer.engine.steps_run == before:
            break
        assert time.monotonic() < deadline, "the pipeline never stopped after the cancel"
        before = servicer.engine.steps_run
    await asyncio.sleep(1.0)  # ...then about 5 more steps at this size if the loop were still running
    assert servicer.engine.steps_run == before, "the pipeline kept denoising after the client left"
    assert server.limit.in_flight == 0, "the concurrency slot was not released"


GOOD = dict(prompt="a red fox", steps=1)


@pytest.mark.parametrize(
    ("call", "kwargs", "code", "reason", "field"),
    [
        ("generate", dict(prompt=""), "INVALID_ARGUMENT", "INVALID_FIELD", "prompt"),
        ("generate", dict(prompt="   "), "INVALID_ARGUMENT", "INVALID_FIELD", "prompt"),
        ("generate", dict(prompt="x" * 5000), "OUT_OF_RANGE", "INVALID_FIELD", "prompt"),
        ("generate", dict(width=100), "INVALID_ARGUMENT", "INVALID_FIELD", "width"),
        ("generate", dict(width=4096), "OUT_OF_RANGE", "INVALID_FIELD", "width"),
        ("generate", dict(height=0), "OUT_OF_RANGE", "INVALID_FIELD", "height"),
        ("generate", dict(width=2048, height=2048, num_images=2), "OUT_OF_RANGE", "INVALID_FIELD", "num_images"),
        ("generate", dict(steps=0), "OUT_OF_RANGE", "INVALID_FIELD", "steps"),
        ("generate", dict(steps=1000), "OUT_OF_RANGE", "INVALID_FIELD", "steps"),
        ("generate", dict(guidance_scale=-2.0), "OUT_OF_RANGE", "INVALID_FIELD", "guidance_scale"),
        ("generate", dict(num_images=5), "OUT_OF_RANGE", "INVALID_FIELD", "num_images"),
        ("generate", dict(num_images=0), "OUT_OF_RANGE", "INVALID_FIELD", "num_images"),
        ("generate", dict(seed=-3), "OUT_OF_RANGE", "INVALID_FIELD", "seed"),
        ("transform", dict(image=b""), "INVALID_ARGUMENT", "INVALID_FIELD", "image"),
        ("transform", dict(image=b"\x89PNG garbage"), "INVALID_ARGUMENT", "UNSUPPORTED_MEDIA", "image"),
        ("transform", dict(image=encoded("PNG")[:120]), "INVALID_ARGUMENT", "UNSUPPORTED_MEDIA", "image"),
        ("transform", dict(image=encoded("BMP")), "INVALID_ARGUMENT", "UNSUPPORTED_MEDIA", "image"),
        ("transform", dict(image=encoded("PNG", (3000, 64))), "OUT_OF_RANGE", "INVALID_FIELD", "image"),
        ("transform", dict(image=encoded("PNG"), strength=0.0), "OUT_OF_RANGE", "INVALID_FIELD", "strength"),
        ("transform", dict(image=encoded("PNG"), strength=1.01), "OUT_OF_RANGE", "INVALID_FIELD", "strength"),
        ("transform", dict(image=encoded("PNG"), strength=0.4, steps=2), "OUT_OF_RANGE", "INVALID_FIELD",
         "strength"),
    ],
)
async def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(served, call, kwargs, code, reason, field):
    _, server, client = served
    args = {**GOOD, **kwargs}
    if call == "transform":
        args.setdefault("strength", 1.0)
        stream = client.image.transform_image(MODEL, args.pop("image"), args.pop("prompt"), **args)
    else:
        stream = client.image.generate_image(MODEL, args.pop("prompt"), **args)
    with pytest.raises(aimesh.AimeshError) as caught:
        [e async for e in stream]
    assert caught.value.code.name == code
    assert caught.value.reason == reason and caught.value.domain == "aimesh.dev"
    assert caught.value.metadata["field"] == field and field in caught.value.field_violations
    ok = [e async for e in client.image.transform_image(MODEL, encoded("PNG"), "fine", steps=1, strength=1.0)]
    assert ok[-1].result.usage.output_units == 1
    assert server.limit.in_flight == 0


async def test_unknown_model_is_not_found(served):
    _, _, client = served
    with pytest.raises(aimesh.NotFoundError) as caught:
        [e async for e in client.image.generate_image("dall-e-9", "x")]
    assert caught.value.reason == "MODEL_NOT_FOUND" and caught.value.metadata["available"] == MODEL


async def test_undecodable_bytes_are_invalid_argument(served):
    _, server, _ = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        raw = channel.unary_stream("/aimesh.image.v1.ImageGenerationService/GenerateImage",
                                   request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [m async for m in raw(b"\xff\xff\xff\xff", timeout=10)]
    error = aimesh.errors.from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "MALFORMED_REQUEST"


def test_aimesh_serve_image_answers_the_sync_client():
    # Naming the builtin source explicitly still marks the responses as random weights.
    with server_process("serve", "image", "--source", "builtin:tiny-sd") as proc:
        proc.wait_serving()
        with aimesh.Client(f"127.0.0.1:{proc.port}", max_attempts=1) as client:
            events = list(client.image.generate_image(MODEL, "a boat", steps=2, seed=4))
            # Leaving a stream early cancels it and leaves the server able to answer.
            for event in client.image.generate_image(MODEL, "a slow one", width=256, height=256, steps=150):
                break
            again = list(client.image.generate_image(MODEL, "a boat", steps=2, seed=4))
    assert kinds(events) == ["progress", "progress", "image", "result"]
    assert event.HasField("progress")
    assert events[2].image.png == again[2].image.png
    assert events[-1].result.served_by.random_weights


async def test_concurrent_same_shape_calls_share_pipeline_calls(served):
    servicer, server, client = served
    before = servicer.engine.batch_sizes.copy()

    async def one(seed: int) -> list:
        return [e async for e in client.image.generate_image(MODEL, "a boat", steps=10, seed=seed)]

    results = await asyncio.gather(*(one(seed) for seed in range(4)))
    assert all(r[-1].HasField("result") for r in results)
    assert [r[-2].image.seed for r in results] == [0, 1, 2, 3]
    sizes = servicer.engine.batch_sizes - before
    assert sum(size * calls for size, calls in sizes.items()) == 4
    assert max(sizes) > 1, f"every call ran alone: {dict(sizes)}"
    assert server.limit.in_flight == 0
