"""Speech-to-text on Whisper, with no gRPC in sight.

Two backends behind one engine, chosen by what the source folder holds:
- `model.bin` (a CTranslate2 conversion): faster-whisper, int8 on CPU. The offline
  default, `builtin:whisper-base`, is one.
- `*.pt` (openai-whisper's own checkpoint format, large-v3 in production): openai-whisper.

Each call gets a `RecognitionSession`. Whole files (`recognize`) go to Whisper in one
piece, so its own 30 s windowing and conditioning apply. Streams are cut into windows as
the audio arrives: once `window_s` seconds are buffered, Whisper transcribes the buffer,
every segment but the last is decided (the last may run past the buffer's end, cut
mid-word), and the buffer drops what was decided. The stream's end decides the rest.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from ..models import builtin
from ..runtime.errors import InvalidArgument
from .audio import WHISPER_RATE, AudioDecoder


@dataclass(frozen=True)
class RecognitionOptions:
    encoding: str = "file"  # "file" | "pcm_s16le"
    sample_rate_hz: int = 0
    language: str = ""  # ISO 639-1; empty: detect
    word_timestamps: bool = False


@dataclass(frozen=True)
class Word:
    text: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Segment:
    text: str
    start: float  # seconds from the start of the audio
    end: float
    words: tuple[Word, ...] = ()

    def shifted(self, offset: float) -> Segment:
        return replace(
            self,
            start=self.start + offset,
            end=self.end + offset,
            words=tuple(replace(w, start=w.start + offset, end=w.end + offset) for w in self.words),
        )


@dataclass
class EngineLimits:
    max_audio_s: float = 1800.0


class _Backend(Protocol):
    languages: frozenset[str]

    def transcribe(
        self,
        samples: np.ndarray,
        language: str | None,
        word_timestamps: bool,
        cancel: threading.Event,
    ) -> tuple[str, Iterator[Segment]]:
        """(language spoken, segments as Whisper decides them); stops early once `cancel` is set."""


class _FasterWhisper:
    def __init__(self, path: str, threads: int, beam_size: int) -> None:
        from faster_whisper import WhisperModel

        self.model = WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=threads)
        self.languages = frozenset(self.model.supported_languages)
        self.beam_size = beam_size

    def transcribe(
        self,
        samples: np.ndarray,
        language: str | None,
        word_timestamps: bool,
        cancel: threading.Event,
    ) -> tuple[str, Iterator[Segment]]:
        # Language detection runs here; the segments are decoded lazily, window by window.
        segments, info = self.model.transcribe(
            samples, language=language, word_timestamps=word_timestamps, beam_size=self.beam_size
        )

        def decided() -> Iterator[Segment]:
            for s in segments:
                yield Segment(
                    s.text,
                    s.start,
                    s.end,
                    tuple(Word(w.word, w.start, w.end, w.probability) for w in s.words or ()),
                )
                if cancel.is_set():  # ends the generator: no further window is decoded
                    return

        return info.language, decided()


class _OpenAIWhisper:
    """openai-whisper runs a whole buffer in one call: cancel takes effect after it."""

    def __init__(self, checkpoint: Path, threads: int, beam_size: int) -> None:
        import torch
        import whisper
        from whisper.tokenizer import LANGUAGES

        torch.set_num_threads(threads)
        self.whisper = whisper
        self.model = whisper.load_model(str(checkpoint), device="cpu")
        self.languages = frozenset(LANGUAGES if self.model.is_multilingual else ("en",))
        self.beam_size = beam_size

    def transcribe(
        self,
        samples: np.ndarray,
        language: str | None,
        word_timestamps: bool,
        cancel: threading.Event,
    ) -> tuple[str, Iterator[Segment]]:
        options = {"beam_size": self.beam_size} if self.beam_size > 1 else {}
        result = self.whisper.transcribe(
            self.model,
            samples,
            language=language,
            word_timestamps=word_timestamps,
            fp16=False,
            verbose=None,
            **options,
        )
        segments = [
            Segment(
                s["text"],
                float(s["start"]),
                float(s["end"]),
                tuple(
                    Word(w["word"], float(w["start"]), float(w["end"]), float(w["probability"]))
                    for w in s.get("words", ())
                ),
            )
            for s in result["segments"]
        ]
        return result["language"], iter(segments)


@dataclass
class SttEngine:
    source: str
    limits: EngineLimits = field(default_factory=EngineLimits)
    threads: int = 2
    beam_size: int = 5
    window_s: float = 30.0  # streaming: audio buffered before Whisper decides segments
    tail_s: float = 1.0  # streaming: a lone segment ending this close to the buffer's end waits

    def load(self) -> None:
        path = Path(builtin.resolve(self.source))
        checkpoint = path if path.suffix == ".pt" else None
        if path.is_dir() and not (path / "model.bin").is_file():
            checkpoint = next(iter(sorted(path.glob("*.pt"))), None)
        # Anything else is for faster-whisper: a CTranslate2 folder, a size name or a hub id.
        self.backend: _Backend = (
            _OpenAIWhisper(checkpoint, self.threads, self.beam_size)
            if checkpoint
            else _FasterWhisper(str(path), self.threads, self.beam_size)
        )

    def session(self, options: RecognitionOptions, *, field: str) -> RecognitionSession:
        """A call's state; raises for bad options. `field`: where the audio comes in."""
        language = options.language.strip().lower().replace("_", "-").split("-")[0]
        if language and language not in self.backend.languages:
            raise InvalidArgument(
                f"language {options.language!r} is not one this model knows; leave it empty to detect it",
                field="config.language",
            )
        decoder = AudioDecoder(
            options.encoding,
            options.sample_rate_hz,
            field=field,
            max_seconds=self.limits.max_audio_s,
        )
        return RecognitionSession(self, decoder, language, options.word_timestamps)


@dataclass
class RecognitionSession:
    engine: SttEngine
    decoder: AudioDecoder
    language: str  # given, or detected by the first transcription
    word_timestamps: bool
    _buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _offset: float = 0.0  # seconds of audio before the buffer's start (already decided)
    _fresh: int = 0  # samples that arrived since the last decision

    @property
    def seconds(self) -> float:
        """Audio heard so far."""
        return self.decoder.seconds

    def _append(self, samples: np.ndarray) -> None:
        if len(samples):
            self._buffer = np.concatenate([self._buffer, samples])
            self._fresh += len(samples)

    def _transcribe(self, cancel: threading.Event) -> Iterator[Segment]:
        language, segments = self.engine.backend.transcribe(
            self._buffer, self.language or None, self.word_timestamps, cancel
        )
        self.language = language
        return segments

    # -- whole files ------------------------------------------------------------------

    def load(self, audio: bytes) -> None:
        """Decodes a whole file; raises for broken or too long audio. Blocking."""
        self._append(self.decoder.feed(audio))
        self._append(self.decoder.finish())

    def recognize(self, cancel: threading.Event) -> Iterator[Segment]:
        yield from self._transcribe(cancel)

    # -- streams ----------------------------------------------------------------------

    def feed(self, chunk: bytes) -> bool:
        """Takes a chunk; True when a window is full and a third of it is new since the
        last decision (a held segment is not transcribed again for every chunk)."""
        self._append(self.decoder.feed(chunk))
        window = self.engine.window_s * WHISPER_RATE
        return len(self._buffer) >= window and self._fresh >= window / 3

    def decide(self, cancel: threading.Event) -> Iterator[Segment]:
        """Segments the buffer settles; the audio they cover leaves the buffer."""
        buffered = len(self._buffer) / WHISPER_RATE
        self._fresh = 0
        held: Segment | None = None
        cut, decided = 0.0, 0  # seconds from the buffer's start that are decided; segments
        for segment in self._transcribe(cancel):
            if held is not None:
                yield held.shifted(self._offset)
                cut, decided = min(segment.start, held.end), decided + 1
            held = segment
        if held is None:  # nothing said: keep only a tail where a word may be starting
            cut = buffered - self.engine.tail_s
        elif not decided and (
            held.end < buffered - self.engine.tail_s or buffered >= 2 * self.engine.window_s
        ):  # a lone segment is decided once it ended before the tail (or the buffer is long)
            yield held.shifted(self._offset)
            cut = held.end
        cut = min(max(cut, 0.0), buffered)
        self._offset += cut
        self._buffer = self._buffer[int(cut * WHISPER_RATE) :]

    def finish(self, cancel: threading.Event) -> Iterator[Segment]:
        """After the last chunk: raises for broken audio, then decides the rest."""
        self._append(self.decoder.finish())
        if len(self._buffer):
            for segment in self._transcribe(cancel):
                yield segment.shifted(self._offset)
