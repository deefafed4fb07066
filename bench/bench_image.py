"""Seconds per image: the diffusers pipeline called directly (the baseline) against the
same pipeline through ImageEngine and through a real in-process gRPC server, measured in
the same run (taking turns) and printed as ratios to the baseline.

    .venv/bin/python bench/bench_image.py --width 64 --height 64 --steps 20 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Callable

import aimesh
import torch
from aimesh_servers import image
from aimesh_servers.image.engine import ImageRequest
from aimesh_servers.runtime.runner import ModelServer
from aimesh_servers.runtime.settings import ServerSettings

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def timed(runs: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each run, after one warm-up each. The runs take turns, so that
    load from elsewhere on the machine weighs on all of them alike."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, samples in zip(runs, times):
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


async def main(args: argparse.Namespace) -> None:
    settings = ServerSettings(port=0, drain_delay_s=0, drain_grace_s=1, torch_threads=args.threads)
    model = image.DEFAULT_MODEL if args.source is None else image.ServedModel(id="bench", source=args.source)
    servicer = image.build(model, settings)
    server = ModelServer(settings, [servicer])
    await server.start()  # loads the model
    engine = servicer.engine
    size = dict(width=args.width, height=args.height)
    kwargs = dict(num_inference_steps=args.steps, num_images_per_prompt=args.images, **size)

    def direct() -> None:
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(args.images)]
        engine.text2img(PROMPT, generator=generators, output_type="pil", **kwargs)

    def through_engine(previews: bool) -> Callable[[], None]:
        request = ImageRequest(PROMPT, steps=args.steps, num_images=args.images, seed=0,
                               previews=previews, **size)
        return lambda: list(engine.stream(engine.prepare(request), threading.Event()))

    loop = asyncio.get_running_loop()
    async with aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:

        async def grpc_call(previews: bool) -> None:
            async for _ in client.image.generate_image(model.id, PROMPT, steps=args.steps, seed=0,
                                                       num_images=args.images, previews=previews, **size):
                pass

        def through_grpc(previews: bool) -> Callable[[], None]:
            return lambda: asyncio.run_coroutine_threadsafe(grpc_call(previews), loop).result()

        rows = [("diffusers pipeline, direct (baseline)", direct),
                ("ImageEngine (+PNG encoding)", through_engine(False)),
                ("gRPC server + SDK client", through_grpc(False)),
                ("gRPC server + SDK client, previews", through_grpc(True))]
        # The timing loop blocks: keep it off the server's event loop.
        seconds = await asyncio.to_thread(timed, [run for _, run in rows], args.repeats)
    await server.drain()

    print(f"{args.width}x{args.height}, {args.steps} steps, {args.images} image(s) per call, "
          f"{args.threads} torch threads, model {model.source}, median of {args.repeats}")
    for (name, _), median in zip(rows, seconds):
        print(f"  {name:40s} {median / args.images:8.3f} s/image   x{median / seconds[0]:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=1, help="num_images per call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--source", help="pipeline id or path (default: builtin:tiny-sd)")
    asyncio.run(main(parser.parse_args()))
