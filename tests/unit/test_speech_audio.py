"""Audio decoding and encoding (servers/aimesh_servers/speech/audio.py) on files made by
libsndfile, whole and chunk by chunk."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
from aimesh_servers.runtime.errors import InvalidArgument, OutOfRange, UnsupportedMedia
from aimesh_servers.speech import audio

RATE = 22_050


def tone(seconds: float = 1.0, rate: int = RATE, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def as_file(samples: np.ndarray, fmt: str, subtype: str, rate: int = RATE) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def decode(
    data: bytes, encoding: str = "file", rate: int = 0, max_seconds: float = 60
) -> np.ndarray:
    return audio.decode(data, encoding, rate, field="audio", max_seconds=max_seconds)


def chunked(data: bytes, size: int, encoding: str = "file", rate: int = 0) -> np.ndarray:
    decoder = audio.AudioDecoder(encoding, rate, field="audio_chunk", max_seconds=60)
    parts = [decoder.feed(data[i : i + size]) for i in range(0, len(data), size)]
    return np.concatenate([*parts, decoder.finish()])


def at_16k(samples: np.ndarray) -> np.ndarray:
    return decode(audio.wav_header(RATE) + audio.to_s16le(samples))


@pytest.mark.parametrize(
    ("fmt", "subtype", "kind"),
    [
        ("WAV", "PCM_16", "wav"),
        ("WAV", "PCM_24", "wav"),
        ("WAV", "PCM_32", "wav"),
        ("WAV", "PCM_U8", "wav"),
        ("WAV", "FLOAT", "wav"),
        ("WAV", "DOUBLE", "wav"),
        ("FLAC", "PCM_16", "flac"),
        ("OGG", "VORBIS", "ogg"),
        ("MP3", "MPEG_LAYER_III", "mp3"),
    ],
)
def test_each_container_decodes_to_16k_mono_whole_and_in_chunks(fmt, subtype, kind):
    reference = at_16k(tone())
    stereo = np.stack([tone(), tone()], axis=1)
    data = as_file(stereo, fmt, subtype)
    assert audio.sniff(data[:12]) == kind
    whole = decode(data)
    assert len(whole) == pytest.approx(16_000, abs=1200)  # MP3 pads its frames
    assert np.array_equal(chunked(data, 1001), whole), "chunk boundaries change nothing"
    if kind in ("wav", "flac"):  # lossless: the same samples as the reference
        assert np.abs(whole - reference).max() < 0.01
    else:  # lossy (and MP3 shifted by its encoder delay): still a 440 Hz tone, as loud
        spectrum = np.abs(np.fft.rfft(whole[:16_000]))
        assert np.argmax(spectrum) == pytest.approx(440, abs=2)  # 1 Hz bins
        assert 0.4 < np.abs(whole[2000:14000]).max() < 0.6


def test_pcm_needs_a_rate_in_range_and_whole_samples():
    pcm = audio.to_s16le(tone())
    assert len(decode(pcm, "pcm_s16le", RATE)) == pytest.approx(16_000, abs=2)
    assert np.array_equal(chunked(pcm, 333, "pcm_s16le", RATE), decode(pcm, "pcm_s16le", RATE))
    with pytest.raises(InvalidArgument) as missing:
        decode(pcm, "pcm_s16le", 0)
    assert missing.value.field == "config.sample_rate_hz"
    with pytest.raises(OutOfRange):
        decode(pcm, "pcm_s16le", 4000)
    with pytest.raises(UnsupportedMedia, match="even"):
        decode(pcm + b"\x00", "pcm_s16le", RATE)


def test_16k_audio_is_not_resampled():
    samples = tone(rate=16_000)
    out = decode(as_file(samples, "WAV", "FLOAT", 16_000))
    assert np.array_equal(out, samples)


def test_open_ended_wav_reads_to_the_end():
    data = audio.wav_header(RATE) + audio.to_s16le(tone(0.5))
    samples, rate = soundfile.read(io.BytesIO(data))  # libsndfile accepts our streamed header
    assert rate == RATE and len(samples) == RATE // 2
    assert len(decode(data)) == pytest.approx(8000, abs=2)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda wav: wav[:-1000], "truncated"),
        (lambda wav: wav[:30], "header"),
        (lambda wav: wav[:-1], "truncated"),
        (lambda wav: wav[:12] + wav[36:], "before a 'fmt ' chunk"),
        (lambda wav: as_file(tone(), "WAV", "IMA_ADPCM"), "not supported"),
        (lambda wav: b"\x89PNG\r\n\x1a\n" + bytes(100), "not a WAV, FLAC, MP3 or OGG"),
        (lambda wav: b"RIFF", "too few"),
        (lambda wav: _corrupt(as_file(tone(), "FLAC", "PCM_16")), "could not decode the FLAC"),
        (lambda wav: as_file(tone(), "FLAC", "PCM_16")[:60], "could not decode the FLAC"),
        (lambda wav: _half(as_file(tone(), "MP3", "MPEG_LAYER_III")), "MP3 audio is truncated"),
    ],
    ids=[
        "truncated-data",
        "header-only",
        "half-a-sample",
        "no-fmt",
        "adpcm",
        "png",
        "tiny",
        "corrupt-flac",
        "flac-header-only",
        "truncated-mp3",
    ],
)
def test_broken_files_are_unsupported_media_naming_the_field(make, match):
    data = make(as_file(tone(), "WAV", "PCM_16"))
    for decoding in (lambda: decode(data), lambda: chunked(data, 500)):
        with pytest.raises(UnsupportedMedia, match=match) as caught:
            decoding()
        assert caught.value.field in ("audio", "audio_chunk")


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _corrupt(data: bytes) -> bytes:
    broken = bytearray(data)
    broken[len(broken) // 3 : len(broken) // 3 + 2000] = np.random.default_rng(1).bytes(2000)
    return bytes(broken)


def test_empty_and_too_long_audio():
    with pytest.raises(InvalidArgument, match="no audio"):
        decode(b"")
    with pytest.raises(OutOfRange) as too_long:
        decode(audio.to_s16le(tone(3.0)), "pcm_s16le", RATE, max_seconds=2.5)
    assert too_long.value.metadata["max_seconds"] == "2.5"
    with pytest.raises(OutOfRange):  # a compressed file, refused from its header
        decode(as_file(tone(3.0), "FLAC", "PCM_16"), max_seconds=2.5)
    # A stream is stopped as soon as it passes the limit, not at its end.
    decoder = audio.AudioDecoder("pcm_s16le", RATE, field="audio_chunk", max_seconds=1.0)
    decoder.feed(audio.to_s16le(tone(0.9)))
    with pytest.raises(OutOfRange):
        decoder.feed(audio.to_s16le(tone(0.2)))


def test_ogg_output_is_one_readable_file():
    data = audio.to_ogg_vorbis(tone(), RATE)
    samples, rate = soundfile.read(io.BytesIO(data))
    assert rate == RATE and len(samples) == RATE
