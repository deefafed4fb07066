"""Seconds per image: the diffusers pipeline called directly (the baseline) against the
same pipeline through ImageEngine and through a real in-process gRPC server, measured in
the same run (taking turns) and printed as ratios of the best times to the baseline's.

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
from common import report  # bench/common.py: run as a script, bench/ is on sys.path

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def timed(runs: list[Callable[[], object]], repeats: int) -> list[tuple[float, float]]:
    """(best, median) seconds of each run, after one warm-up each. The runs take turns, so
    that load from elsewhere on the machine weighs on all of them alike."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, samples in zip(runs, times):
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start)
    return [(min(samples), statistics.median(samples)) for samples in times]


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
        # In a fresh thread, as ImageEngine runs the pipeline: only our overhead differs.
        worker = threading.Thread(target=lambda: engine.text2img(
            PROMPT, generator=generators, output_type="pil", **kwargs))
        worker.start()
        worker.join()

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
          f"{args.threads} torch threads, model {model.source}, {args.repeats} runs each")
    print(f"  {'':40s} {'best s/image':>12s} {'median':>8s}   best vs baseline")
    base = seconds[0][0]
    for (name, _), (best, median) in zip(rows, seconds):
        print(f"  {name:40s} {best / args.images:12.3f} {median / args.images:8.3f}   x{best / base:.3f}")
    report("image", args.json, [], {
        "width": args.width, "height": args.height, "steps": args.steps, "images_per_call": args.images,
        "repeats": args.repeats, "source": model.source,
        "rows": {name: {"best_s_per_image": round(best / args.images, 4),
                        "median_s_per_image": round(median / args.images, 4), "x_baseline": round(best / base, 3)}
                 for (name, _), (best, median) in zip(rows, seconds)},
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=1, help="num_images per call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--source", help="pipeline id or path (default: builtin:tiny-sd)")
    parser.add_argument("--json", help="write the results here")
    asyncio.run(main(parser.parse_args()))
