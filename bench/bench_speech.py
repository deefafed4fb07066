"""Speech, all in one run with the offline defaults (Whisper base int8, Piper joe-medium):

- STT real-time factor (seconds of work per second of audio) of faster-whisper called
  directly on the WAV (the baseline) against Recognize and StreamingRecognize through a
  real in-process gRPC server and the SDK, runs interleaved; printed as ratios.
- TTS time to the first audio chunk against the whole synthesis, through the server.

    .venv/bin/python bench/bench_speech.py --sentences 6 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import threading
import time

import aimesh
from aimesh_servers.runtime.runner import ModelServer
from aimesh_servers.runtime.settings import ServerSettings
from aimesh_servers.speech import stt, tts
from aimesh_servers.speech.tts_engine import SynthesisRequest
from common import (  # bench/common.py: run as a script, bench/ is on sys.path
    report,
    timed_round_robin,
)

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A mesh routes every request to a pool of model servers.",
    "Each tenant pays for the seconds of audio it sends.",
    "The sun was shining on the green hills all afternoon.",
    "Streaming speech recognition returns segments as soon as they are decided.",
    "Nobody noticed when the last train left the station.",
)


async def main(args: argparse.Namespace) -> None:
    settings = ServerSettings(port=0, drain_delay_s=0, drain_grace_s=1, torch_threads=args.threads)
    stt_servicer = stt.build(stt.DEFAULT_MODEL, settings)
    tts_servicer = tts.build(tts.DEFAULT_MODEL, settings)
    server = ModelServer(settings, [stt_servicer, tts_servicer])
    await server.start()  # loads both models
    text = " ".join((SENTENCES * args.sentences)[: args.sentences])
    pieces = list(tts_servicer.engine.stream(SynthesisRequest(text), threading.Event()))
    wav = b"".join(p.audio for p in pieces)
    audio_s = sum(p.seconds for p in pieces)
    whisper = stt_servicer.engine.backend.model  # the same loaded weights as the server's

    def direct() -> None:
        segments, _ = whisper.transcribe(
            io.BytesIO(wav), language="en", beam_size=stt_servicer.engine.beam_size
        )
        list(segments)

    async with aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:

        async def recognize() -> None:
            await client.stt.recognize(stt.DEFAULT_MODEL.id, wav, language="en")

        async def streaming() -> None:
            chunks = [wav[i : i + 32_000] for i in range(0, len(wav), 32_000)]
            async for _ in client.stt.streaming_recognize(
                stt.DEFAULT_MODEL.id, chunks, language="en"
            ):
                pass

        results = await timed_round_robin(
            {
                "faster-whisper direct (baseline)": direct,
                "Recognize, gRPC server + SDK": recognize,
                f"StreamingRecognize ({stt_servicer.engine.window_s:g} s windows)": streaming,
            },
            args.repeats,
        )

        firsts, wholes = [], []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            first = None
            async for _ in client.tts.synthesize(tts.DEFAULT_MODEL.id, text, format="pcm_s16le"):
                first = first or time.perf_counter() - start
            firsts.append(first)
            wholes.append(time.perf_counter() - start)
    await server.drain()

    base = results["faster-whisper direct (baseline)"]
    print(
        f"STT: Whisper base int8, {audio_s:.1f} s of Piper speech ({args.sentences} sentences), "
        f"{args.threads} threads, median of {args.repeats}"
    )
    for name, seconds in results.items():
        print(
            f"  {name:40s} RTF {seconds / audio_s:.3f}   x{base / seconds:.2f} of the baseline speed"
        )
    first, whole = statistics.median(firsts[1:]), statistics.median(wholes[1:])
    print(
        f"TTS: Piper en_US-joe-medium through the server, {len(text)} characters -> {audio_s:.1f} s"
    )
    print(f"  first audio chunk {first * 1000:7.0f} ms")
    print(
        f"  whole synthesis   {whole * 1000:7.0f} ms   (first chunk at {first / whole:.0%} of it; "
        f"RTF {whole / audio_s:.3f})"
    )
    report("speech", args.json, [], {
        "audio_s": round(audio_s, 2), "sentences": args.sentences, "repeats": args.repeats,
        "stt_rtf": {name: round(seconds / audio_s, 4) for name, seconds in results.items()},
        "tts_first_audio_ms": round(first * 1000, 1), "tts_whole_ms": round(whole * 1000, 1),
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    asyncio.run(main(parser.parse_args()))
