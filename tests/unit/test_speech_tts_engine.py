"""The Piper TTS engine on the real en_US-joe-medium voice, with no gRPC."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from aimesh_servers.runtime.errors import InvalidArgument, ModelNotFound, OutOfRange
from aimesh_servers.speech.audio import wav_header
from aimesh_servers.speech.tts_engine import SynthesisRequest, TtsEngine, split_sentences

from tests.speech_audio import read


@pytest.fixture(scope="module")
def engine() -> TtsEngine:
    engine = TtsEngine("builtin:piper-voices")
    engine.load()
    return engine


def test_sentences_split_at_ends_and_long_ones_at_commas():
    assert split_sentences(" Hi there.  How are you?\nFine; thanks!", 100) == [
        "Hi there.",
        "How are you?",
        "Fine;",
        "thanks!",
    ]
    assert split_sentences("Version 2.5 is out.", 100) == ["Version 2.5 is out."]
    long = split_sentences("one, two, three, four, five", 12)
    assert long == ["one, two,", "three, four,", "five"]
    assert split_sentences("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]


def test_phoneme_ids_follow_piper_bos_pad_eos(engine):
    voice = engine.voice("")
    phonemes = voice.phonemes("Hello world")
    assert phonemes.endswith(".") and "ˈ" in phonemes  # IPA with stress marks from espeak-ng
    ids = voice.ids(phonemes)
    table = voice.phoneme_ids
    assert ids[0] == table["^"][0] and ids[-1] == table["$"][0]
    assert ids[2::2][:-1] == [table["_"][0]] * (len(ids[2::2]) - 1), "a pad after every phoneme"
    assert voice.phonemes("...") == ""


def test_stream_speaks_each_sentence_in_the_asked_format(engine):
    text = "The first sentence. And a second one!"
    wav = list(engine.stream(SynthesisRequest(text), threading.Event()))
    assert [p.text for p in wav] == ["The first sentence.", "And a second one!"]
    assert wav[0].audio.startswith(wav_header(22050)) and not wav[1].audio.startswith(b"RIFF")
    samples, rate = read(b"".join(p.audio for p in wav))
    assert rate == 22050 and len(samples) / rate == pytest.approx(
        sum(p.seconds for p in wav), abs=0.01
    )
    assert np.abs(samples).max() > 0.1, "audible"
    ogg = list(engine.stream(SynthesisRequest(text, format="ogg"), threading.Event()))
    assert all(p.audio[:4] == b"OggS" for p in ogg)
    pcm = list(engine.stream(SynthesisRequest(text, format="pcm_s16le"), threading.Event()))
    assert all(len(p.audio) == 2 * round(p.seconds * 22050) for p in pcm)


def test_speed_scales_the_duration(engine):
    def seconds(speed: float) -> float:
        return sum(
            p.seconds
            for p in engine.stream(
                SynthesisRequest("A sentence of moderate length.", speed=speed), threading.Event()
            )
        )

    normal, fast, slow = seconds(1.0), seconds(2.0), seconds(0.5)
    assert fast < 0.7 * normal < normal < 0.7 * slow


def test_cancel_stops_between_sentences(engine):
    cancel = threading.Event()
    before = engine.sentences_synthesized
    pieces = engine.stream(SynthesisRequest(" ".join(["One more sentence."] * 10)), cancel)
    next(pieces)
    cancel.set()
    assert list(pieces) == []
    assert engine.sentences_synthesized - before == 1


@pytest.mark.parametrize(
    ("request_", "error", "field"),
    [
        (SynthesisRequest(""), InvalidArgument, "text"),
        (SynthesisRequest("?!"), InvalidArgument, "text"),
        (SynthesisRequest("a" * 5001), OutOfRange, "text"),
        (SynthesisRequest("Hi.", voice="nobody"), ModelNotFound, "voice"),
        (SynthesisRequest("Hi.", language="de"), InvalidArgument, "language"),
        (SynthesisRequest("Hi.", speed=0.2), OutOfRange, "speed"),
        (SynthesisRequest("Hi.", format="mp3"), InvalidArgument, "format"),
    ],
)
def test_validate_names_the_bad_field(engine, request_, error, field):
    with pytest.raises(error) as caught:
        engine.validate(request_)
    assert caught.value.field == field


def test_language_and_voice_forms_that_are_accepted(engine):
    for language in ("en", "en-US", "en_us", "EN"):
        engine.validate(SynthesisRequest("Hi.", voice="en_US-joe-medium", language=language))
