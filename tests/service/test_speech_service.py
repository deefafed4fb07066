"""SpeechToTextService and TextToSpeechService over a real in-process grpc.aio server:
the real Piper voice speaks, the real Whisper base listens, through the SDK."""

from __future__ import annotations

import asyncio
import io
import time

import aimesh
import grpc
import numpy as np
import pytest
import soundfile
from aimesh.speech.v1 import speech_to_text_pb2 as stt_pb
from aimesh.speech.v1 import speech_to_text_pb2_grpc as stt_grpc
from aimesh_servers.runtime.settings import ServerSettings
from aimesh_servers.speech import stt, tts
from aimesh_servers.speech.audio import wav_header
from aimesh_servers.speech.stt_engine import EngineLimits, SttEngine
from aimesh_servers.speech.stt_servicer import SpeechToTextServicer

from tests.servers import in_process_server, server_process
from tests.speech_audio import SENTENCES, WORDS, encode, pcm_s16le, read, words_in

STT, TTS = stt.DEFAULT_MODEL.id, tts.DEFAULT_MODEL.id
MAX_AUDIO_S = 60
WINDOW_S = 4.0


@pytest.fixture(scope="module")
async def served():
    # A short streaming window and audio limit, so tests see both with little audio.
    engine = SttEngine(
        stt.DEFAULT_MODEL.source, window_s=WINDOW_S, limits=EngineLimits(MAX_AUDIO_S)
    )
    stt_servicer = SpeechToTextServicer(stt.DEFAULT_MODEL, engine, "local")
    tts_servicer = tts.build(tts.DEFAULT_MODEL, ServerSettings())
    async with in_process_server([stt_servicer, tts_servicer], max_concurrency=2) as (server, _):
        client = aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1)
        yield tts_servicer.engine, server, client
        await client.close()


async def _speak(client: aimesh.AsyncClient, text: str, **kwargs) -> list:
    return [piece async for piece in client.tts.synthesize(TTS, text, **kwargs)]


@pytest.fixture(scope="module")
async def speech(served) -> bytes:
    """SENTENCES spoken by our TTS, as one WAV file."""
    _, _, client = served
    return b"".join(p.audio_chunk for p in await _speak(client, " ".join(SENTENCES)))


@pytest.fixture(scope="module")
async def short(served) -> bytes:
    """A short clip (less than a streaming window) for the good call after a bad one."""
    _, _, client = served
    return b"".join(p.audio_chunk for p in await _speak(client, "The quick brown fox."))


async def test_round_trip_text_to_speech_to_text(served):
    _, _, client = served
    text = " ".join(SENTENCES)
    pieces = await _speak(client, text)
    assert [p.text for p in pieces[:-1]] == list(SENTENCES), "one audio piece per sentence"
    assert pieces[0].audio_chunk[:4] == b"RIFF" and pieces[1].audio_chunk[:4] != b"RIFF"
    last = pieces[-1]
    assert not last.audio_chunk and last.served_by.model == TTS and last.served_by.pool == "local"
    assert last.usage.unit == "characters" and last.usage.input_units == len(text)
    wav = b"".join(p.audio_chunk for p in pieces)
    samples, rate = read(wav)
    assert rate == 22050 and last.usage.output_units == pytest.approx(len(samples) / rate, abs=0.01)

    heard = await client.stt.recognize(STT, wav)
    assert set(WORDS) <= words_in(heard.text), heard.text
    assert heard.language == "en" and heard.served_by.model == STT
    assert heard.usage.unit == "audio_seconds"
    assert heard.usage.input_units == pytest.approx(len(samples) / rate, abs=0.01)
    starts = [s.start.ToTimedelta().total_seconds() for s in heard.segments]
    ends = [s.end.ToTimedelta().total_seconds() for s in heard.segments]
    assert starts == sorted(starts) and all(e > s for s, e in zip(starts, ends))
    assert ends[-1] <= heard.usage.input_units + 0.1


@pytest.mark.parametrize("fmt", ["FLAC", "OGG", "MP3", "PCM"])
async def test_recognize_reads_each_format(served, speech, fmt):
    _, _, client = served
    samples, rate = read(speech)
    if fmt == "PCM":
        out = await client.stt.recognize(
            STT,
            pcm_s16le(samples),
            encoding="pcm_s16le",
            sample_rate_hz=rate,
            language="en",
            word_timestamps=True,
        )
        words = [w for s in out.segments for w in s.words]
        # The Piper voice samples noise, so Whisper may hear the first word differently
        # from run to run; that speech starts at once and "fox" is heard are stable.
        assert words and words[0].start.ToTimedelta().total_seconds() < 0.5
        assert "fox" in [w.text.strip(" .").lower() for w in words]
        times = [w.start.ToTimedelta().total_seconds() for w in words]
        assert times == sorted(times) and all(0 < w.probability <= 1 for w in words)
    else:
        out = await client.stt.recognize(STT, encode(samples, rate, fmt))
    assert {"fox", "dog", "green", "hills"} <= words_in(out.text), out.text


async def test_streaming_recognize_decides_segments_while_audio_still_arrives(served, speech):
    _, server, client = served
    events: list[str] = []
    first_segment = asyncio.Event()
    # The clip twice (our WAV is open-ended: its PCM can simply follow), ~10 s: the first
    # sentence (~2.7 s) ends well inside the first window, which decides it.
    clip = speech + speech[len(wav_header(22050)) :]
    chunk = 16 * 1024  # 0.37 s of 22,050 Hz s16 audio

    async def chunks():
        for i in range(0, len(clip), chunk):
            if i + chunk >= len(clip):  # the last chunk waits for a decided segment
                await asyncio.wait_for(first_segment.wait(), 60)
            events.append("chunk")
            yield clip[i : i + chunk]

    replies = []
    async for reply in client.stt.streaming_recognize(STT, chunks(), language="en"):
        replies.append(reply)
        if reply.HasField("segment"):
            events.append("segment")
            first_segment.set()
    assert events.index("segment") < len(events) - 1 - events[::-1].index("chunk"), (
        "a segment came back before the last chunk was sent"
    )
    segments = [r.segment for r in replies if r.HasField("segment")]
    assert len(segments) >= 2
    starts = [s.start.ToTimedelta().total_seconds() for s in segments]
    assert starts == sorted(starts) and starts[0] < 0.5 and starts[-1] > 1.0
    assert set(WORDS) <= words_in("".join(s.text for s in segments))
    last = replies[-1]
    assert not last.HasField("segment") and last.language == "en"
    assert last.usage.unit == "audio_seconds"
    assert last.usage.input_units == pytest.approx(len(read(clip)[0]) / 22050, abs=0.01)
    assert last.served_by.model == STT
    assert server.limit.in_flight == 0


async def test_list_voices_speed_and_output_formats(served):
    _, _, client = served
    voices = (await client.tts.list_voices(TTS)).voices
    assert [(v.id, list(v.languages), v.sample_rate_hz) for v in voices] == [
        ("en_US-joe-medium", ["en"], 22050)
    ]
    text = "Speak slowly. Then speak fast."
    pcm = await _speak(client, text, format="pcm_s16le", voice="en_US-joe-medium", language="en-US")
    raw = b"".join(p.audio_chunk for p in pcm)
    assert len(raw) % 2 == 0 and len(raw) / 2 / 22050 == pytest.approx(
        pcm[-1].usage.output_units, abs=0.01
    )
    ogg = await _speak(client, text, format="ogg")
    for piece in ogg[:-1]:  # each piece is a whole Ogg Vorbis file
        samples, rate = soundfile.read(io.BytesIO(piece.audio_chunk))
        assert rate == 22050 and len(samples) > 0.3 * rate
    fast = await _speak(client, text, format="pcm_s16le", speed=2.0)
    assert fast[-1].usage.output_units < 0.7 * pcm[-1].usage.output_units


async def test_first_audio_leaves_before_the_last_sentence_and_cancel_stops_synthesis(served):
    engine, server, client = served
    text = " ".join(f"This is sentence number {n}." for n in range(1, 13))
    before = engine.sentences_synthesized
    stream = client.tts.synthesize(TTS, text, format="pcm_s16le")
    first = await anext(stream)
    done_at_first = engine.sentences_synthesized - before
    assert first.text == "This is sentence number 1." and first.audio_chunk
    assert done_at_first < 12, "the first piece waited for the whole text"
    await stream.aclose()  # cancels the call
    # Until the server has seen the cancel (the sentence being made may still finish), then
    # the count must stay still.
    deadline = time.monotonic() + 60
    stopped_at = engine.sentences_synthesized - before
    while True:
        await asyncio.sleep(1.0)
        if engine.sentences_synthesized - before == stopped_at:
            break
        assert time.monotonic() < deadline, "synthesis never stopped after cancel"
        stopped_at = engine.sentences_synthesized - before
    await asyncio.sleep(1.0)
    assert engine.sentences_synthesized - before == stopped_at < 12, (
        "synthesis went on after cancel"
    )
    assert server.limit.in_flight == 0


def _raw_pcm_too_long() -> bytes:
    return bytes(2 * 8000 * (MAX_AUDIO_S + 1))  # silence at 8 kHz


@pytest.mark.parametrize(
    ("make", "kwargs", "code", "reason", "field"),
    [
        (lambda wav: _sized(wav)[:-999], {}, "INVALID_ARGUMENT", "UNSUPPORTED_MEDIA", "audio"),
        (lambda wav: wav[:30], {}, "INVALID_ARGUMENT", "UNSUPPORTED_MEDIA", "audio"),
        (lambda wav: _corrupt_flac(wav), {}, "INVALID_ARGUMENT", "UNSUPPORTED_MEDIA", "audio"),
        (
            lambda wav: b"\x89PNG\r\n\x1a\n" + bytes(200),
            {},
            "INVALID_ARGUMENT",
            "UNSUPPORTED_MEDIA",
            "audio",
        ),
        (lambda wav: b"", {}, "INVALID_ARGUMENT", "INVALID_FIELD", "audio"),
        (
            lambda wav: bytes(3200),
            {"encoding": "pcm_s16le"},
            "INVALID_ARGUMENT",
            "INVALID_FIELD",
            "config.sample_rate_hz",
        ),
        (
            lambda wav: bytes(3200),
            {"encoding": "pcm_s16le", "sample_rate_hz": 1000},
            "OUT_OF_RANGE",
            "INVALID_FIELD",
            "config.sample_rate_hz",
        ),
        (
            lambda wav: bytes(3201),
            {"encoding": "pcm_s16le", "sample_rate_hz": 16000},
            "INVALID_ARGUMENT",
            "UNSUPPORTED_MEDIA",
            "audio",
        ),
        (
            lambda wav: _raw_pcm_too_long(),
            {"encoding": "pcm_s16le", "sample_rate_hz": 8000},
            "OUT_OF_RANGE",
            "INVALID_FIELD",
            "audio",
        ),
        (
            lambda wav: wav,
            {"language": "xx"},
            "INVALID_ARGUMENT",
            "INVALID_FIELD",
            "config.language",
        ),
        (lambda wav: wav, {"encoding": 7}, "INVALID_ARGUMENT", "INVALID_FIELD", "config.encoding"),
    ],
    ids=[
        "truncated-wav",
        "wav-header-only",
        "corrupt-flac",
        "png",
        "empty",
        "pcm-without-rate",
        "pcm-rate-1000",
        "pcm-odd-bytes",
        "too-long",
        "unknown-language",
        "unknown-encoding",
    ],
)
async def test_bad_audio_gets_a_clear_error_and_the_server_keeps_serving(
    served, short, make, kwargs, code, reason, field
):
    _, server, client = served
    with pytest.raises(aimesh.AimeshError) as caught:
        await client.stt.recognize(STT, make(short), **kwargs)
    assert caught.value.code.name == code and caught.value.reason == reason
    assert caught.value.metadata["field"] == field and field in caught.value.field_violations
    assert "fox" in words_in((await client.stt.recognize(STT, short)).text)
    assert server.limit.in_flight == 0


def _sized(wav: bytes) -> bytes:
    """The clip as a WAV whose header states its length (ours streams open-ended)."""
    return encode(*read(wav), "WAV")


def _corrupt_flac(wav: bytes) -> bytes:
    samples, rate = read(wav)
    flac = bytearray(encode(samples, rate, "FLAC"))
    flac[len(flac) // 3 : len(flac) // 3 + 1000] = np.random.default_rng(0).bytes(1000)
    return bytes(flac)


def _config(**kwargs) -> stt_pb.StreamingRecognizeRequest:
    return stt_pb.StreamingRecognizeRequest(model=STT, config=stt_pb.RecognitionConfig(**kwargs))


@pytest.mark.parametrize(
    ("make", "code", "reason", "field"),
    [
        (lambda wav: [], "INVALID_ARGUMENT", "INVALID_FIELD", "config"),
        (
            lambda wav: [stt_pb.StreamingRecognizeRequest(audio_chunk=wav)],
            "INVALID_ARGUMENT",
            "INVALID_FIELD",
            "config",
        ),
        (lambda wav: [_config()], "INVALID_ARGUMENT", "INVALID_FIELD", "audio_chunk"),
        (
            lambda wav: [
                _config(),
                stt_pb.StreamingRecognizeRequest(audio_chunk=_sized(wav)[:-999]),
            ],
            "INVALID_ARGUMENT",
            "UNSUPPORTED_MEDIA",
            "audio_chunk",
        ),
        (
            lambda wav: [
                _config(encoding=stt_pb.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=8000),
                stt_pb.StreamingRecognizeRequest(audio_chunk=_raw_pcm_too_long()),
            ],
            "OUT_OF_RANGE",
            "INVALID_FIELD",
            "audio_chunk",
        ),
        (
            lambda wav: [_config(language="klingon")],
            "INVALID_ARGUMENT",
            "INVALID_FIELD",
            "config.language",
        ),
    ],
    ids=[
        "no-message",
        "audio-before-config",
        "no-audio",
        "truncated-wav",
        "too-long",
        "unknown-language",
    ],
)
async def test_bad_streams_get_a_clear_error_and_the_server_keeps_serving(
    served, short, make, code, reason, field
):
    _, server, client = served
    stub = stt_grpc.SpeechToTextServiceStub(client.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.StreamingRecognize(iter(make(short)), timeout=60):
            pass
    error = aimesh.errors.from_rpc_error(caught.value)
    assert error.code.name == code and error.reason == reason
    assert error.metadata["field"] == field and field in error.field_violations
    replies = [r async for r in client.stt.streaming_recognize(STT, [short[:5000], short[5000:]])]
    assert "fox" in words_in("".join(r.segment.text for r in replies))
    assert server.limit.in_flight == 0


@pytest.mark.parametrize(
    ("text", "kwargs", "code", "reason", "field"),
    [
        ("", {}, "INVALID_ARGUMENT", "INVALID_FIELD", "text"),
        (" ... ", {}, "INVALID_ARGUMENT", "INVALID_FIELD", "text"),
        ("word " * 1001, {}, "OUT_OF_RANGE", "INVALID_FIELD", "text"),
        ("Hi.", {"voice": "en_GB-nobody"}, "NOT_FOUND", "MODEL_NOT_FOUND", "voice"),
        ("Hi.", {"language": "fr"}, "INVALID_ARGUMENT", "INVALID_FIELD", "language"),
        ("Hi.", {"speed": 10.0}, "OUT_OF_RANGE", "INVALID_FIELD", "speed"),
        ("Hi.", {"speed": 0.0}, "OUT_OF_RANGE", "INVALID_FIELD", "speed"),
        ("Hi.", {"format": 9}, "INVALID_ARGUMENT", "INVALID_FIELD", "format"),
    ],
    ids=[
        "empty",
        "punctuation-only",
        "too-long",
        "unknown-voice",
        "unknown-language",
        "too-fast",
        "zero-speed",
        "unknown-format",
    ],
)
async def test_bad_synthesis_gets_a_clear_error_and_the_server_keeps_serving(
    served, text, kwargs, code, reason, field
):
    _, server, client = served
    with pytest.raises(aimesh.AimeshError) as caught:
        await _speak(client, text, **kwargs)
    assert caught.value.code.name == code and caught.value.reason == reason
    assert caught.value.metadata["field"] == field and field in caught.value.field_violations
    if field == "voice":
        assert caught.value.metadata["available"] == "en_US-joe-medium"
    assert (await _speak(client, "Fine."))[0].audio_chunk
    assert server.limit.in_flight == 0


async def test_unknown_models_are_not_found(served, short):
    _, _, client = served
    with pytest.raises(aimesh.NotFoundError) as caught:
        await client.stt.recognize("whisper-huge", short)
    assert caught.value.reason == "MODEL_NOT_FOUND" and caught.value.metadata["available"] == STT
    with pytest.raises(aimesh.NotFoundError):
        await client.tts.list_voices("xtts-v2")
    with pytest.raises(aimesh.NotFoundError):
        await _speak(client, "Hi.", model_version="9")


async def test_blocking_client_streams_both_ways(served, speech):
    _, server, _ = served

    def use() -> tuple[list, list]:
        with aimesh.Client(f"127.0.0.1:{server.port}", max_attempts=1) as client:
            spoken = list(client.tts.synthesize(TTS, "Good morning.", format="wav"))
            chunks = (speech[i : i + 32_000] for i in range(0, len(speech), 32_000))
            heard = list(client.stt.streaming_recognize(STT, chunks))
        return spoken, heard

    spoken, heard = await asyncio.to_thread(use)
    assert spoken[0].audio_chunk[:4] == b"RIFF" and spoken[-1].usage.input_units == len(
        "Good morning."
    )
    assert {"fox", "hills"} <= words_in("".join(r.segment.text for r in heard))
    assert heard[-1].usage.input_units > 4


def test_aimesh_serve_runs_both_capabilities():
    with server_process("serve", "tts") as speaker, server_process("serve", "stt") as listener:
        speaker.wait_serving()
        listener.wait_serving()
        with aimesh.Client(f"127.0.0.1:{speaker.port}", max_attempts=1) as client:
            wav = b"".join(p.audio_chunk for p in client.tts.synthesize(TTS, SENTENCES[0]))
        with aimesh.Client(f"127.0.0.1:{listener.port}", max_attempts=1) as client:
            heard = client.stt.recognize(STT, wav)
    assert {"fox", "lazy", "dog"} <= words_in(heard.text), heard.text
