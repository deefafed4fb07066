"""ImageEngine without gRPC: the real diffusers pipeline on the tiny random-weight SD."""

from __future__ import annotations

import io
import threading
import time

import pytest
from aimesh_servers.image.engine import Done, FinishedImage, ImageEngine, ImageRequest, StepDone
from aimesh_servers.runtime.errors import InvalidArgument, OutOfRange, UnsupportedMedia
from PIL import Image


@pytest.fixture(scope="module")
def engine() -> ImageEngine:
    engine = ImageEngine("builtin:tiny-sd")
    engine.load()
    return engine


def run(engine: ImageEngine, request: ImageRequest) -> list[StepDone | FinishedImage | Done]:
    return list(engine.stream(engine.prepare(request), threading.Event()))


def encoded(fmt: str, size: tuple[int, int] = (100, 70)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_defaults_come_from_the_pipeline(engine):
    assert (engine.default_side, engine.default_steps, engine.default_guidance) == (64, 50, 7.5)
    events = run(engine, ImageRequest("a red fox", steps=2, seed=1))
    (image,) = [e for e in events if isinstance(e, FinishedImage)]
    assert (image.width, image.height) == (64, 64)


def test_events_come_in_order_one_progress_per_step(engine):
    events = run(engine, ImageRequest("a red fox", width=128, height=64, steps=6, seed=5, num_images=3))
    progress = [e for e in events if isinstance(e, StepDone)]
    images = [e for e in events if isinstance(e, FinishedImage)]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5, 6]
    assert {p.total_steps for p in progress} == {6}
    assert events == [*progress, *images, Done(images=3, steps=6)]
    assert [(i.index, i.seed) for i in images] == [(0, 5), (1, 6), (2, 7)]
    for image in images:
        decoded = Image.open(io.BytesIO(image.png))
        assert decoded.format == "PNG" and decoded.size == (128, 64) == (image.width, image.height)
    assert len({i.png for i in images}) == 3, "each image has its own seed"


def test_same_seed_same_png_bytes_other_seed_other_image(engine):
    request = ImageRequest("a lighthouse", negative_prompt="fog", steps=4, seed=42, guidance_scale=5.0)
    first = [e.png for e in run(engine, request) if isinstance(e, FinishedImage)]
    again = [e.png for e in run(engine, request) if isinstance(e, FinishedImage)]
    other = [e.png for e in run(engine, ImageRequest("a lighthouse", negative_prompt="fog", steps=4,
                                                     seed=43, guidance_scale=5.0))
             if isinstance(e, FinishedImage)]
    assert first == again
    assert first != other


def test_unset_seed_is_random_and_reported(engine):
    seeds = {e.seed for _ in range(2) for e in run(engine, ImageRequest("x", steps=1))
             if isinstance(e, FinishedImage)}
    assert len(seeds) == 2


def test_previews_are_small_pngs_only_when_asked(engine):
    with_previews = run(engine, ImageRequest("a cat", width=128, height=64, steps=3, seed=1, previews=True))
    for step in (e for e in with_previews if isinstance(e, StepDone)):
        assert Image.open(io.BytesIO(step.preview_png)).size == (16, 8)  # one pixel per latent
    without = run(engine, ImageRequest("a cat", width=128, height=64, steps=3, seed=1))
    assert all(e.preview_png == b"" for e in without if isinstance(e, StepDone))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_image_to_image_runs_steps_times_strength_at_the_input_size(engine, fmt):
    events = run(engine, ImageRequest("a blue fox", image=encoded(fmt), strength=0.5, steps=10, seed=3))
    progress = [e for e in events if isinstance(e, StepDone)]
    (image,) = [e for e in events if isinstance(e, FinishedImage)]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5] and progress[-1].total_steps == 5
    assert (image.width, image.height) == (96, 64)  # 100x70 cropped to multiples of 8
    assert events[-1] == Done(images=1, steps=5)


def test_cancel_stops_the_denoising_loop(engine):
    cancel = threading.Event()
    job = engine.prepare(ImageRequest("a long one", width=256, height=256, steps=100, seed=1))
    events = []
    for event in engine.stream(job, cancel):
        events.append(event)
        if isinstance(event, StepDone) and event.step == 2:
            cancel.set()
    # The stream ended by itself soon after the cancel, with no image and no result.
    assert all(isinstance(e, StepDone) for e in events) and len(events) < 5
    before = engine.steps_run
    time.sleep(0.5)  # about 3 more steps at this size if the loop were still running
    assert engine.steps_run == before


def test_closing_the_stream_early_stops_the_work_too(engine):
    start = engine.steps_run
    stream = engine.stream(engine.prepare(ImageRequest("x", width=256, height=256, steps=100)),
                           threading.Event())
    next(stream)
    stream.close()  # returns once the worker has left the pipeline
    assert engine.steps_run - start < 100, "the denoising loop ran to the end"
    assert [e for e in run(engine, ImageRequest("x", steps=1)) if isinstance(e, Done)]


@pytest.mark.parametrize(
    ("request_kwargs", "error", "field"),
    [
        (dict(prompt=""), InvalidArgument, "prompt"),
        (dict(prompt=" \n"), InvalidArgument, "prompt"),
        (dict(prompt="x" * 2001), OutOfRange, "prompt"),
        (dict(negative_prompt="x" * 2001), OutOfRange, "negative_prompt"),
        (dict(width=100), InvalidArgument, "width"),
        (dict(width=4096), OutOfRange, "width"),
        (dict(height=32), OutOfRange, "height"),
        (dict(width=2048, height=2048, num_images=2), OutOfRange, "num_images"),
        (dict(steps=0), OutOfRange, "steps"),
        (dict(steps=151), OutOfRange, "steps"),
        (dict(guidance_scale=-1.0), OutOfRange, "guidance_scale"),
        (dict(guidance_scale=float("nan")), OutOfRange, "guidance_scale"),
        (dict(num_images=0), OutOfRange, "num_images"),
        (dict(num_images=5), OutOfRange, "num_images"),
        (dict(seed=-1), OutOfRange, "seed"),
        (dict(image=b""), InvalidArgument, "image"),
        (dict(image=b"not an image at all"), UnsupportedMedia, "image"),
        (dict(image=encoded("PNG")[:200]), UnsupportedMedia, "image"),
        (dict(image=encoded("GIF")), UnsupportedMedia, "image"),
        (dict(image=encoded("PNG", (4096, 64))), OutOfRange, "image"),
        (dict(image=encoded("PNG", (32, 64))), OutOfRange, "image"),
        (dict(image=encoded("PNG"), strength=0.0), OutOfRange, "strength"),
        (dict(image=encoded("PNG"), strength=1.5), OutOfRange, "strength"),
        (dict(image=encoded("PNG"), strength=0.05, steps=10), OutOfRange, "strength"),
    ],
)
def test_bad_requests_raise_with_the_field(engine, request_kwargs, error, field):
    request = ImageRequest(**{"prompt": "a red fox", **request_kwargs})
    with pytest.raises(error) as caught:
        engine.prepare(request)
    assert caught.value.field == field


@pytest.fixture(scope="module")
def batching() -> ImageEngine:
    """An engine whose batches wait (up to 30 s) until 4 images of a shape are there."""
    engine = ImageEngine("builtin:tiny-sd", max_batch=4, batch_wait_s=30)
    engine.load()
    return engine


def max_pixel_difference(a: bytes, b: bytes) -> int:
    pixels = [Image.open(io.BytesIO(png)).convert("RGB").tobytes() for png in (a, b)]
    return max(abs(x - y) for x, y in zip(*pixels, strict=True))


def run_together(engine: ImageEngine, requests: list[ImageRequest]) -> list[list]:
    jobs = [engine.prepare(r) for r in requests]
    results: list[list] = [[] for _ in jobs]
    threads = [threading.Thread(target=lambda i=i: results[i].extend(engine.stream(jobs[i], threading.Event())))
               for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a request never finished"
    return results


def test_same_shape_requests_share_one_pipeline_call_and_keep_their_own_images(batching, engine):
    requests = [ImageRequest("a red fox", steps=3, seed=1),
                ImageRequest("a blue boat", negative_prompt="fog", steps=3, seed=2, num_images=2),
                ImageRequest("a green tree", steps=3, seed=3, previews=True)]
    before = batching.batch_sizes.copy()
    results = run_together(batching, requests)
    assert batching.batch_sizes - before == {4: 1}, "one pipeline call for the 4 images"
    for request, events in zip(requests, results, strict=True):
        steps = [e for e in events if isinstance(e, StepDone)]
        images = [e for e in events if isinstance(e, FinishedImage)]
        assert [s.step for s in steps] == [1, 2, 3] and events[-1] == Done(request.num_images, 3)
        assert [i.seed for i in images] == [request.seed + k for k in range(request.num_images)]
        assert all(bool(s.preview_png) == request.previews for s in steps)
        # Batched, a request gets the image it gets alone, up to float rounding in the
        # batched matmuls (PNG bytes differ; pixels by a level or two out of 255).
        alone = [e.png for e in run(engine, request) if isinstance(e, FinishedImage)]
        for got, expected in zip(images, alone, strict=True):
            difference = max_pixel_difference(got.png, expected)
            print(f"max pixel difference batched vs alone: {difference}")
            assert difference <= 2


def test_other_shapes_run_in_their_own_calls(batching):
    before = batching.batch_sizes.copy()
    results = run_together(batching, [ImageRequest("x", steps=2, seed=1, num_images=2),
                                       ImageRequest("x", steps=3, seed=1, num_images=2)])
    assert batching.batch_sizes - before == {2: 2}
    assert [e[-1] for e in results] == [Done(2, 2), Done(2, 3)]


def test_a_request_cancelled_in_a_batch_leaves_while_the_others_finish(batching):
    jobs = [batching.prepare(ImageRequest("a long one", width=128, height=128, steps=40, seed=s,
                                          num_images=2)) for s in (1, 2)]
    cancels = [threading.Event(), threading.Event()]
    kept: list = []
    survivor = threading.Thread(target=lambda: kept.extend(batching.stream(jobs[1], cancels[1])))
    survivor.start()
    left = []
    for event in batching.stream(jobs[0], cancels[0]):
        left.append(event)
        if isinstance(event, StepDone) and event.step == 2:
            cancels[0].set()
    survivor.join(120)
    assert all(isinstance(e, StepDone) for e in left) and len(left) < 5
    assert kept[-1] == Done(images=2, steps=40)
