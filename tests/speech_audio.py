"""Test audio made by real encoders (libsndfile through soundfile), never canned bytes."""

from __future__ import annotations

import io

import numpy as np
import soundfile

# Two sentences spoken by the Piper voice, whose sampling noise makes every synthesis a
# little different. WORDS are those Whisper base heard in every one of 20 trials (whole and
# streamed); "Paris", "brown" and "jumps" came back "pairs", "round" and "jumped" at times.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "The sun was shining on the green hills.",
)
WORDS = ("fox", "lazy", "dog", "shining", "green", "hills")


def words_in(transcript: str) -> set[str]:
    return {w.strip(".,!?;:").lower() for w in transcript.split()}


def read(data: bytes) -> tuple[np.ndarray, int]:
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    return samples, rate


def encode(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """samples as a WAV, FLAC, OGG (Vorbis) or MP3 file."""
    subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}[fmt]
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def pcm_s16le(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
