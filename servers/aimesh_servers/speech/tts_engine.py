"""Text-to-speech with Piper voices on plain onnxruntime, with no gRPC in sight.

A Piper voice is a VITS model exported to ONNX (`NAME.onnx`) plus its config
(`NAME.onnx.json`). Text is split into sentences; each sentence is turned into IPA
phonemes by `espeak-ng --ipa` (a subprocess: espeak-ng is GPL, we only run it), mapped
through the config's `phoneme_id_map` (BOS, each phoneme followed by PAD, EOS, as
Piper does) and synthesized. `stream` yields one piece of audio per sentence, so the
first sound leaves before the rest is synthesized, and a cancel stops between sentences.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime

from ..models import builtin
from ..runtime.errors import AimeshError, InvalidArgument, ModelNotFound, OutOfRange
from .audio import to_ogg_vorbis, to_s16le, wav_header

FORMATS = ("wav", "pcm_s16le", "ogg")
MIN_SPEED, MAX_SPEED = 0.25, 4.0
# Sentence ends: . ! ? ; (and their CJK forms) followed by space, or line breaks.
_SENTENCE_END = re.compile(r"(?<=[.!?;。！？])\s+|\n+")


class VoiceNotFound(ModelNotFound):
    """NOT_FOUND like an unknown model (same reason), naming the field `voice`."""

    def __init__(self, voice: str, available: list[str]) -> None:
        AimeshError.__init__(
            self,
            f"voice {voice!r} does not exist; available: {', '.join(sorted(available))}",
            field="voice",
            metadata={"voice": voice, "available": ",".join(sorted(available))},
        )


@dataclass(frozen=True)
class SynthesisRequest:
    text: str
    voice: str = ""  # empty: the first voice
    language: str = ""  # empty: the voice's own
    speed: float = 1.0
    format: str = "wav"


@dataclass(frozen=True)
class AudioPiece:
    audio: bytes
    text: str  # the sentence this piece speaks
    sample_rate: int
    seconds: float


@dataclass
class EngineLimits:
    max_chars: int = 5000
    max_sentence_chars: int = 400  # longer sentences are split at commas or spaces


def split_sentences(text: str, max_chars: int) -> list[str]:
    """Sentences of `text`, none longer than `max_chars`."""
    sentences = []
    for sentence in _SENTENCE_END.split(text.strip()):
        sentence = sentence.strip()
        while len(sentence) > max_chars:
            head = sentence[: max_chars + 1]  # a break right after the limit still fits
            cut = head.rfind(", ") + 1 or head.rfind(" ")
            if cut <= 0:
                cut = max_chars
            sentences.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            sentences.append(sentence)
    return sentences


def _language(code: str) -> str:
    """ISO 639-1 part of a code: "en_US" / "en-us" -> "en"."""
    return code.strip().lower().replace("_", "-").split("-")[0]


class PiperVoice:
    def __init__(self, model: Path, threads: int) -> None:
        self.id = model.name.removesuffix(".onnx")
        config = json.loads(model.with_name(model.name + ".json").read_text())
        self.sample_rate = int(config["audio"]["sample_rate"])
        self.espeak_voice = config["espeak"]["voice"]
        self.language = _language(config.get("language", {}).get("code", self.espeak_voice))
        self.phoneme_ids = config["phoneme_id_map"]
        inference = config.get("inference", {})
        self.noise_scale = float(inference.get("noise_scale", 0.667))
        self.length_scale = float(inference.get("length_scale", 1.0))
        self.noise_w = float(inference.get("noise_w", 0.8))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle workers sleep instead of spinning: the cores are shared with other servers.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            str(model), options, providers=["CPUExecutionProvider"]
        )

    def phonemes(self, sentence: str) -> str:
        """IPA for one sentence; espeak-ng's clause breaks become commas."""
        done = subprocess.run(
            ["espeak-ng", "-q", "--ipa", "-v", self.espeak_voice],
            input=sentence,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            # Not a domain error: its stderr is for our log; the caller gets INTERNAL and an incident id.
            raise RuntimeError(f"espeak-ng failed ({done.returncode}): {done.stderr.strip()}")
        clauses = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        if not clauses:
            return ""
        end = sentence[-1] if sentence[-1] in ".!?" else "."
        return unicodedata.normalize("NFD", ", ".join(clauses) + end)

    def ids(self, phonemes: str) -> list[int]:
        pad, ids = self.phoneme_ids["_"], list(self.phoneme_ids["^"])
        for phoneme in phonemes:
            if phoneme in self.phoneme_ids:  # Piper skips symbols its voice was not trained on
                ids += self.phoneme_ids[phoneme] + pad
        return ids + self.phoneme_ids["$"]

    def synthesize(self, sentence: str, speed: float) -> np.ndarray:
        phonemes = self.phonemes(sentence)
        if not phonemes:
            return np.zeros(0, np.float32)
        ids = self.ids(phonemes)
        audio = self.session.run(
            None,
            {
                "input": np.array([ids], dtype=np.int64),
                "input_lengths": np.array([len(ids)], dtype=np.int64),
                "scales": np.array(
                    [self.noise_scale, self.length_scale / speed, self.noise_w], dtype=np.float32
                ),
            },
        )[0]
        return audio.reshape(-1)


@dataclass
class TtsEngine:
    source: str
    limits: EngineLimits = field(default_factory=EngineLimits)
    threads: int = 2
    # Sentences synthesized over the engine's life: observable proof of streaming and cancel.
    sentences_synthesized: int = 0

    def load(self) -> None:
        if shutil.which("espeak-ng") is None:
            raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
        path = Path(builtin.resolve(self.source))
        models = sorted(path.glob("*.onnx")) if path.is_dir() else [path]
        models = [m for m in models if m.with_name(m.name + ".json").is_file()]
        if not models:
            raise FileNotFoundError(f"no Piper voice (NAME.onnx + NAME.onnx.json) in {path}")
        self.voices = {v.id: v for v in (PiperVoice(m, self.threads) for m in models)}
        self._count_lock = threading.Lock()

    def voice(self, voice_id: str) -> PiperVoice:
        if not voice_id:
            return next(iter(self.voices.values()))
        if voice_id not in self.voices:
            raise VoiceNotFound(voice_id, list(self.voices))
        return self.voices[voice_id]

    def validate(self, request: SynthesisRequest) -> None:
        if not any(c.isalnum() for c in request.text):
            raise InvalidArgument("text has nothing to speak", field="text")
        if len(request.text) > self.limits.max_chars:
            raise OutOfRange(
                f"text is {len(request.text)} characters; the limit is {self.limits.max_chars}",
                field="text",
                metadata={"max_chars": str(self.limits.max_chars)},
            )
        voice = self.voice(request.voice)
        if request.language and _language(request.language) != voice.language:
            raise InvalidArgument(
                f"voice {voice.id!r} speaks {voice.language!r}, not {request.language!r}",
                field="language",
            )
        if not MIN_SPEED <= request.speed <= MAX_SPEED:
            raise OutOfRange(
                f"speed must be in [{MIN_SPEED}, {MAX_SPEED}], got {request.speed:g}", field="speed"
            )
        if request.format not in FORMATS:
            raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}", field="format")

    def stream(self, request: SynthesisRequest, cancel: threading.Event) -> Iterator[AudioPiece]:
        """One piece per sentence, in the asked format; WAV's header leads the first piece."""
        self.validate(request)
        voice = self.voice(request.voice)
        first = True
        for sentence in split_sentences(request.text, self.limits.max_sentence_chars):
            if cancel.is_set():
                return
            samples = voice.synthesize(sentence, request.speed)
            with self._count_lock:
                self.sentences_synthesized += 1
            if not len(samples):
                continue  # nothing to say (punctuation only)
            if request.format == "ogg":
                audio = to_ogg_vorbis(samples, voice.sample_rate)
            else:
                audio = to_s16le(samples)
                if request.format == "wav" and first:
                    audio = wav_header(voice.sample_rate) + audio
            first = False
            yield AudioPiece(audio, sentence, voice.sample_rate, len(samples) / voice.sample_rate)
