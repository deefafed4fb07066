"""The Whisper STT engine with no gRPC: real Whisper base (faster-whisper) on speech from
the real Piper voice, and openai-whisper on a tiny random-weight checkpoint."""

from __future__ import annotations

import itertools
import threading

import pytest
import whisper
from aimesh_servers.runtime.errors import InvalidArgument
from aimesh_servers.speech.stt_engine import RecognitionOptions, SttEngine
from aimesh_servers.speech.tts_engine import SynthesisRequest, TtsEngine

from tests.speech_audio import SENTENCES, WORDS, words_in


@pytest.fixture(scope="module")
def speech() -> bytes:
    tts = TtsEngine("builtin:piper-voices")
    tts.load()
    return b"".join(
        p.audio for p in tts.stream(SynthesisRequest(" ".join(SENTENCES)), threading.Event())
    )


@pytest.fixture(scope="module")
def engine() -> SttEngine:
    engine = SttEngine("builtin:whisper-base", window_s=3.0)
    engine.load()
    return engine


def test_recognize_detects_the_language_and_times_the_segments(engine, speech):
    session = engine.session(RecognitionOptions(), field="audio")
    session.load(speech)
    segments = list(session.recognize(threading.Event()))
    assert session.language == "en"
    assert set(WORDS) <= words_in("".join(s.text for s in segments))
    assert segments[0].start < 0.5 and segments[-1].end <= session.seconds + 0.1
    assert all(a.end <= b.start + 0.01 for a, b in itertools.pairwise(segments))


def test_a_stream_decides_segments_that_end_inside_each_full_window(engine, speech):
    session = engine.session(
        RecognitionOptions(language="EN-us", word_timestamps=True), field="audio_chunk"
    )
    decisions = []  # (audio heard when deciding, segments decided)
    for i in range(0, len(speech), 8192):
        if session.feed(speech[i : i + 8192]):
            decisions.append((session.seconds, list(session.decide(threading.Event()))))
    rest = list(session.finish(threading.Event()))
    assert decisions[0][0] == pytest.approx(3.0, abs=0.2), (
        "the first decision once 3 s were buffered"
    )
    assert any(segments for _, segments in decisions), "segments were decided before the end"
    for heard, segments in decisions:
        assert all(s.end <= heard for s in segments), "nothing decided past the buffer's end"
    segments = [s for _, batch in decisions for s in batch] + rest
    assert set(WORDS) <= words_in("".join(s.text for s in segments))
    starts = [s.start for s in segments]
    assert (
        starts[0] < 0.5 and starts == sorted(starts) and segments[-1].end <= session.seconds + 0.1
    )
    words = [w for s in segments for w in s.words]
    assert [w.start for w in words] == sorted(w.start for w in words), (
        "word times shift with the window"
    )


def test_unknown_languages_are_refused_before_any_audio(engine):
    with pytest.raises(InvalidArgument) as caught:
        engine.session(RecognitionOptions(language="xx"), field="audio")
    assert caught.value.field == "config.language"


def test_openai_whisper_checkpoint_runs_through_the_same_sessions(speech):
    # A real .pt checkpoint of openai-whisper's format, random weights: the text is noise.
    engine = SttEngine("builtin:whisper-tiny-random", threads=1, beam_size=1, window_s=3.0)
    engine.load()
    assert isinstance(engine.backend.model, whisper.model.Whisper)
    whole = engine.session(RecognitionOptions(), field="audio")
    whole.load(speech)
    segments = list(whole.recognize(threading.Event()))
    assert whole.language in whisper.tokenizer.LANGUAGES and segments
    assert all(0 <= s.start <= s.end <= whole.seconds + 0.1 for s in segments)
    stream = engine.session(RecognitionOptions(language="en"), field="audio_chunk")
    assert not stream.feed(speech[:20_000])
    assert all(isinstance(s.text, str) for s in stream.finish(threading.Event()))
    assert stream.language == "en"
