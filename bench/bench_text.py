"""Text generation under concurrency: the batching text server against plain sequential
`model.generate`, in the same run.

Measures plain transformers `generate` (float32, one prompt after another, in this
process) as the baseline, then starts a real mesh (`aimesh up --only text`) and runs 1,
4, 16, 32 and 64 concurrent streaming callers (greedy, a different prompt each) through
Envoy, plus 16 callers arriving spread over 2 s: total tokens/s (and its ratio to the
baseline), first-token latency p50/p99, inter-token gap p99, errors. Each stream's text
is compared with the text the server gives that prompt alone (the 1-caller row).
`--direct` adds rows straight to the server; `--precisions` compares float32 and
bfloat16 engines in-process (speed at 16 streams, greedy answers vs float32 alone).
`--engines` runs only the engines in-process (transformers float32, CTranslate2 int8
micro-batches with 1 and 2 batches in flight), between two sequential `generate`
baselines: 16 streams together and spread over 2 s, `--rounds` times each.

    .venv/bin/python bench/bench_text.py [--quick] [--json out.json] [--direct] [--precisions]
    .venv/bin/python bench/bench_text.py --engines [--quick] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aimesh

from bench.common import Goal, machine_info, report

MODEL = "smollm2-135m"
SOURCE = "builtin:smollm2-135m-instruct"
TOPICS = [
    "the history of Paris", "how bees make honey", "the moon landing", "why the sea is salty",
    "the invention of the printing press", "how a bicycle works", "the life of a tree",
    "the first computers", "volcanoes", "the Roman roads", "how rain forms", "the game of chess",
    "penguins in Antarctica", "the Silk Road", "how bread is baked", "the planet Mars",
]
PROMPTS = [f"Write a short paragraph about {topic}." for topic in TOPICS]


def pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def sequential_generate(prompts: list[str], max_tokens: int, threads: int) -> dict[str, Any]:
    """Plain transformers `generate`, float32, greedy, one prompt after another."""
    import torch
    from aimesh_servers.models import builtin
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    path = builtin.resolve(SOURCE)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls, self.at = 0, 0.0

        def put(self, value: torch.Tensor) -> None:
            self.calls += 1
            if self.calls == 2:  # the first put is the prompt
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    tokens, ttfts, texts = 0, [], []
    started = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            streamer = FirstToken()
            begin = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 streamer=streamer, pad_token_id=tokenizer.eos_token_id)
            ttfts.append(streamer.at - begin)
            tokens += out.shape[-1] - ids.shape[-1]
            texts.append(tokenizer.decode(out[0, ids.shape[-1]:], skip_special_tokens=True))
    seconds = time.perf_counter() - started
    return {"prompts": len(prompts), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2), "ttft_p50_s": round(statistics.median(ttfts), 4),
            "texts": texts}


async def one_stream(client: aimesh.AsyncClient, prompt: str, max_tokens: int, delay: float) -> dict[str, Any]:
    await asyncio.sleep(delay)
    begin = time.perf_counter()
    stamps: list[float] = []
    parts: list[str] = []
    tokens = 0
    async for piece in client.text.stream_generate(MODEL, [("user", prompt)], max_tokens=max_tokens):
        if piece.text_delta:
            stamps.append(time.perf_counter())
            parts.append(piece.text_delta)
        if piece.usage.completion_tokens:
            tokens = piece.usage.completion_tokens
    end = time.perf_counter()
    return {"begin": begin, "end": end, "ttft": (stamps[0] if stamps else end) - begin,
            "gaps": [b - a for a, b in itertools.pairwise(stamps)], "tokens": tokens, "text": "".join(parts)}


async def run_row(target: str, callers: int, max_tokens: int, spread_s: float = 0.0,
                  sequential: bool = False) -> dict[str, Any]:
    """`callers` streams (prompt i % 16 each); together, spread evenly over `spread_s`, or
    one after another (`sequential`)."""
    async with aimesh.AsyncClient(target, max_attempts=1, retry_busy=False, timeout=900) as client:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(callers)]
        errors: dict[str, int] = {}
        first_messages: dict[str, str] = {}  # per status: what the first such error said
        results: list[dict[str, Any] | None] = []

        async def guarded(prompt: str, delay: float) -> dict[str, Any] | None:
            try:
                return await one_stream(client, prompt, max_tokens, delay)
            except aimesh.AimeshError as exc:
                name = getattr(exc.code, "name", str(exc.code))
                errors[name] = errors.get(name, 0) + 1
                first_messages.setdefault(name, f"{exc.reason}: {exc}"[:300])
                return None

        started = time.perf_counter()
        if sequential:
            for prompt in prompts:
                results.append(await guarded(prompt, 0.0))
        else:
            delays = [spread_s * i / callers for i in range(callers)]
            results = list(await asyncio.gather(*(guarded(p, d) for p, d in zip(prompts, delays))))
        done = [r for r in results if r is not None]
        seconds = (max(r["end"] for r in done) - started) if done else time.perf_counter() - started
    tokens = sum(r["tokens"] for r in done)
    return {
        "callers": callers, "spread_s": spread_s, "sequential": sequential, "target": target,
        "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
        "ttft_p50_s": round(pct([r["ttft"] for r in done], 50), 4),
        "ttft_p99_s": round(pct([r["ttft"] for r in done], 99), 4),
        "gap_p99_s": round(pct([g for r in done for g in r["gaps"]], 99), 4),
        "errors": errors, "error_messages": first_messages,
        "texts": [r["text"] if r else None for r in results],
    }


def compare(texts: list[str | None], alone: list[str]) -> tuple[int, int, list[dict[str, Any]]]:
    """(equal, compared, differences) of each stream's text vs its prompt's text alone."""
    equal, compared, diffs = 0, 0, []
    for i, text in enumerate(texts):
        if text is None or i % len(PROMPTS) >= len(alone):
            continue
        expected = alone[i % len(PROMPTS)]
        compared += 1
        if text == expected:
            equal += 1
        else:
            at = next((k for k, (a, b) in enumerate(zip(text, expected)) if a != b), min(len(text), len(expected)))
            diffs.append({"stream": i, "first_difference_at_char": at,
                          "batched": text[max(0, at - 20): at + 40], "alone": expected[max(0, at - 20): at + 40]})
    return equal, compared, diffs


def precisions(max_tokens: int, threads: int) -> dict[str, Any]:
    """float32 vs bfloat16 engines in this process: tokens/s of 16 concurrent greedy streams,
    and each one's answers alone compared with float32's."""
    from aimesh_servers.text.engine import TextEngine
    from aimesh_servers.text.request import GenerationRequest
    from aimesh_servers.text.settings import TextSettings

    out: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        engine = TextEngine(SOURCE, threads=threads, settings=TextSettings(dtype=dtype, max_batch=16))
        engine.load()
        request = [GenerationRequest([("user", p)], max_tokens) for p in PROMPTS]

        def run(r: GenerationRequest, engine: TextEngine = engine) -> tuple[str, int]:
            chunks = list(engine.stream(r, threading.Event()))
            return "".join(c.text for c in chunks), chunks[-1].completion_tokens

        alone = [run(r)[0] for r in request]
        batched: list[tuple[str, int]] = [("", 0)] * len(request)

        def worker(i: int, batched: list[tuple[str, int]] = batched,
                   request: list[GenerationRequest] = request) -> None:
            batched[i] = run(request[i])

        started = time.perf_counter()
        threads_ = [threading.Thread(target=worker, args=(i,)) for i in range(len(request))]
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
        seconds = time.perf_counter() - started
        engine.close()
        out[dtype] = {"tokens_per_s_16": round(sum(n for _, n in batched) / seconds, 2), "alone": alone,
                      "batched_equal_alone": sum(a == b for a, (b, _) in zip(alone, batched))}
    reference = out["float32"]["alone"]
    for dtype, row in out.items():
        row["alone_equal_float32"] = sum(a == b for a, b in zip(row["alone"], reference))
    return out


# --engines: the text engines in this process, each as `aimesh serve text` would run it.
ENGINES: dict[str, dict[str, Any]] = {
    "transformers float32": {"engine": "transformers"},
    "ctranslate2 int8, 1 batch in flight": {"engine": "ctranslate2", "batches_in_flight": 1},
    "ctranslate2 int8, 2 batches in flight": {"engine": "ctranslate2", "batches_in_flight": 2},
}


def engine_rows(max_tokens: int, threads: int, rounds: int) -> dict[str, Any]:
    """Each engine in-process, greedy, the 16 prompts: alone (one after another), then 16
    streams arriving together and spread over 2 s (`rounds` times each): tokens/s, TTFT
    p50/p99, each stream vs its answer alone, and answers alone vs float32's."""
    from aimesh_servers.text.engine import TextEngine
    from aimesh_servers.text.request import GenerationRequest
    from aimesh_servers.text.settings import TextSettings

    out: dict[str, Any] = {}
    for name, overrides in ENGINES.items():
        settings = TextSettings(max_batch=16, **overrides)
        if settings.engine == "ctranslate2":
            from aimesh_servers.text.ct2_engine import CT2TextEngine as engine_class
        else:
            engine_class = TextEngine
        engine = engine_class(SOURCE, threads=threads, settings=settings)
        engine.load()
        requests = [GenerationRequest([("user", p)], max_tokens) for p in PROMPTS]

        def run(request: GenerationRequest, begin: float, engine: TextEngine = engine) -> dict[str, Any]:
            first, parts, tokens = None, [], 0
            for chunk in engine.stream(request, threading.Event()):
                if chunk.text and first is None:
                    first = time.perf_counter() - begin
                parts.append(chunk.text)
                tokens = chunk.completion_tokens
            return {"ttft": first, "text": "".join(parts), "tokens": tokens, "end": time.perf_counter()}

        alone = [run(r, time.perf_counter())["text"] for r in requests]
        row: dict[str, Any] = {"alone": alone, "rounds": []}
        for round_ in range(rounds):
            for spread_s in (0.0, 2.0):
                results: list[dict[str, Any]] = [{}] * len(requests)
                started = time.perf_counter()

                def worker(i: int, results: list[dict[str, Any]] = results, started: float = started,
                           spread_s: float = spread_s, requests: list[GenerationRequest] = requests) -> None:
                    time.sleep(spread_s * i / len(requests))
                    results[i] = run(requests[i], time.perf_counter())

                workers = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                seconds = max(r["end"] for r in results) - started
                ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
                row["rounds"].append({
                    "round": round_, "spread_s": spread_s,
                    "tokens_per_s": round(sum(r["tokens"] for r in results) / seconds, 2),
                    "ttft_p50_s": round(pct(ttfts, 50), 4), "ttft_p99_s": round(pct(ttfts, 99), 4),
                    "equal_alone": sum(r["text"] == a for r, a in zip(results, alone))})
        engine.close()
        out[name] = row
    reference = out["transformers float32"]["alone"]
    for row in out.values():
        row["alone_equal_float32"] = sum(a == b for a, b in zip(row.pop("alone"), reference))
    return out


def engines_main(args: argparse.Namespace, max_tokens: int) -> None:
    """--engines: the engine rows between two sequential `generate` baselines, no mesh."""
    print(f"SmolLM2-135M-Instruct, greedy, {max_tokens} new tokens, {args.threads} threads, in-process engines")
    before = sequential_generate(PROMPTS[:4], max_tokens, args.threads)
    rows = engine_rows(max_tokens, args.threads, args.rounds)
    after = sequential_generate(PROMPTS[:4], max_tokens, args.threads)
    base_tps = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
    print(f"  sequential model.generate: {before['tokens_per_s']:.1f} tok/s before, "
          f"{after['tokens_per_s']:.1f} after (load average {machine_info()['load_average']})")
    print(f"\n  {'engine':40s} {'arrival':>8s} {'tok/s':>7s} {'x seq':>6s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
          f"{'= alone':>8s} {'alone = float32':>16s}")
    goals: list[Goal] = []
    for name, row in rows.items():
        for r in row["rounds"]:
            r["ratio"] = round(r["tokens_per_s"] / base_tps, 2)
            how = "over 2 s" if r["spread_s"] else "together"
            print(f"  {name:40s} {how:>8s} {r['tokens_per_s']:7.1f} {r['ratio']:6.1f} "
                  f"{r['ttft_p50_s'] * 1000:7.0f}ms {r['ttft_p99_s'] * 1000:7.0f}ms "
                  f"{r['equal_alone']:>4d}/{len(PROMPTS):<3d} {row['alone_equal_float32']:>12d}/{len(PROMPTS)}")
        best = max(r["ratio"] for r in row["rounds"])
        goals.append(Goal(f"{name}: 16 streams, best tokens/s vs sequential generate", best, ">= 12x", best >= 12))
    report("text-engines", args.json, goals,
           {"max_tokens": max_tokens, "threads": args.threads, "baseline_tokens_per_s": base_tps,
            "baseline": {k: v for k, v in before.items() if k != "texts"},
            "baseline_after": {k: v for k, v in after.items() if k != "texts"}, "engines": rows},
           machine_info())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer levels and tokens")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--direct", action="store_true", help="also run each level straight to the server")
    parser.add_argument("--precisions", action="store_true", help="float32 vs bfloat16, in-process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", action="store_true",
                        help="only the in-process engine comparison (transformers, ctranslate2), no mesh")
    parser.add_argument("--rounds", type=int, default=2, help="--engines: rounds of each arrival pattern")
    args = parser.parse_args()
    max_tokens = args.max_tokens or (32 if args.quick else 64)
    if args.engines:
        engines_main(args, max_tokens)
        return
    levels = [4, 16] if args.quick else [4, 16, 32, 64]
    alone_prompts = PROMPTS[:4] if args.quick else PROMPTS
    # The mesh as deployed (32 slots, a 2 s queue): callers beyond the slots may be refused
    # with RESOURCE_EXHAUSTED, counted as errors (the SDK's busy retries are off).
    os.environ["AIMESH_TORCH_THREADS"] = str(args.threads)

    from tests.mesh.conftest import Mesh

    print(f"SmolLM2-135M-Instruct, greedy, {max_tokens} new tokens, {args.threads} torch threads")
    baseline = sequential_generate(alone_prompts[:2] if args.quick else alone_prompts[:4], max_tokens, args.threads)
    print(f"  sequential model.generate: {baseline['tokens_per_s']:.1f} tok/s, "
          f"first token p50 {baseline['ttft_p50_s'] * 1000:.0f} ms")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        mesh = Mesh(Path(tmp), only=["text"])
        try:
            mesh.wait_ready()
            registration = json.loads(next((Path(tmp) / "registrations").glob("*.json")).read_text())
            direct = f"{registration['address']}:{registration['port']}"
            targets = [("envoy", mesh.front)] + ([("direct", direct)] if args.direct else [])
            asyncio.run(run_row(mesh.front, 1, 4, sequential=True))  # warm-up
            alone_row = asyncio.run(run_row(mesh.front, len(alone_prompts), max_tokens, sequential=True))
            alone_row["name"] = "1 (one after another)"
            rows.append(alone_row)
            alone = alone_row["texts"]
            for name, target in targets:
                for callers in levels:
                    row = asyncio.run(run_row(target, callers, max_tokens))
                    row["name"] = f"{callers} ({name})"
                    rows.append(row)
                    if callers == 16:
                        spread = asyncio.run(run_row(target, 16, max_tokens, spread_s=2.0))
                        spread["name"] = f"16 over 2 s ({name})"
                        rows.append(spread)
        finally:
            mesh.stop()
    # Measured again after the mesh rows: the machine's load may have changed meanwhile.
    final = sequential_generate(alone_prompts[:2], max_tokens, args.threads)
    print(f"  sequential model.generate again: {final['tokens_per_s']:.1f} tok/s")
    base_tps = (baseline["tokens_per_s"] + final["tokens_per_s"]) / 2

    print(f"\n  {'callers':24s} {'tok/s':>8s} {'x seq':>6s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
          f"{'gap p99':>8s} {'errors':>6s} {'= alone':>8s}")
    goals: list[Goal] = []
    for row in rows:
        equal, compared, diffs = compare(row["texts"], alone)
        row.update(ratio=round(row["tokens_per_s"] / base_tps, 2), equal_alone=equal, compared=compared,
                   differences=diffs)
        print(f"  {row['name']:24s} {row['tokens_per_s']:8.1f} {row['ratio']:6.1f} "
              f"{row['ttft_p50_s'] * 1000:7.0f}ms {row['ttft_p99_s'] * 1000:7.0f}ms "
              f"{row['gap_p99_s'] * 1000:6.0f}ms {sum(row['errors'].values()):6d} {equal:>3d}/{compared:<3d}")
        if row["callers"] == 16 and row["name"].endswith("(envoy)"):
            how = "spread over 2 s" if row["spread_s"] else "together"
            goals += [
                Goal(f"16 streams {how}: errors", sum(row["errors"].values()), "0",
                     not row["errors"]),
                Goal(f"16 streams {how}: tokens/s vs sequential generate", row["ratio"], ">= 12x",
                     row["ratio"] >= 12, f"{row['tokens_per_s']:.0f} vs {base_tps:.0f} tok/s"),
                Goal(f"16 streams {how}: TTFT p50 s", row["ttft_p50_s"], "<= 0.5",
                     row["ttft_p50_s"] <= 0.5),
                Goal(f"16 streams {how}: streams equal to their answer alone", equal, f"{compared}/{compared}",
                     equal == compared, "; ".join(f"stream {d['stream']} from char {d['first_difference_at_char']}"
                                                 for d in diffs)),
            ]
        row.pop("texts")
    for row in rows:
        for code, message in row["error_messages"].items():
            print(f"  {row['name']}: {row['errors'][code]} x {code}, e.g. {message}")
        for diff in row["differences"]:
            print(f"  {row['name']}: stream {diff['stream']} differs: {diff['batched']!r} vs alone {diff['alone']!r}")
    results: dict[str, Any] = {"max_tokens": max_tokens, "threads": args.threads,
                               "baseline": {k: v for k, v in baseline.items() if k != "texts"},
                               "baseline_tokens_per_s": base_tps, "rows": rows}
    results["baseline_after"] = {k: v for k, v in final.items() if k != "texts"}
    # The server's float32 answers alone vs plain `generate`: the engine's own numerics.
    same = sum(a == b for a, b in zip(alone, baseline["texts"]))
    print(f"  server alone vs model.generate (float32, greedy): {same}/{len(baseline['texts'])} equal")
    results["alone_equal_generate"] = [same, len(baseline["texts"])]
    if args.precisions:
        results["precisions"] = precisions(max_tokens, args.threads)
        for dtype, row in results["precisions"].items():
            print(f"  {dtype}: 16 streams {row['tokens_per_s_16']:.1f} tok/s; answers alone equal to "
                  f"float32: {row['alone_equal_float32']}/{len(PROMPTS)}; batched equal alone: "
                  f"{row['batched_equal_alone']}/{len(PROMPTS)}")
            row.pop("alone")
    report("text", args.json, goals, results, machine_info())


if __name__ == "__main__":
    main()
