"""Audio in and out, with no gRPC: decoding what callers send, encoding what TTS makes.

In: WAV, FLAC, MP3 or OGG files (detected from their first bytes) or raw s16le PCM,
decoded to mono float32 at 16 kHz, the rate Whisper hears. `AudioDecoder` takes the
bytes as they arrive: PCM and WAV (parsed here, so a truncated WAV is caught) decode
chunk by chunk; the compressed containers decode with libsndfile once complete.
Out: a WAV header with an open-ended length, s16le PCM, one Ogg Vorbis file per piece.
"""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import soundfile

from ..runtime.errors import InvalidArgument, OutOfRange, UnsupportedMedia, media_detail

WHISPER_RATE = 16_000
MIN_PCM_RATE, MAX_PCM_RATE = 8_000, 48_000
# Compressed files are held whole until the stream ends; this bounds that buffer.
MAX_COMPRESSED_BYTES = 128 * 1024 * 1024
_MAX_WAV_HEADER = 1024 * 1024
_OPEN_ENDED = (0, 0xFFFFFFFF)  # data sizes written by streaming WAV writers


def sniff(head: bytes) -> str | None:
    """The container a file's first bytes announce: wav, flac, ogg, mp3, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def _mono(samples: np.ndarray) -> np.ndarray:
    return (
        samples.mean(axis=1, dtype=np.float32) if samples.ndim == 2 else samples.astype(np.float32)
    )


class _WavReader:
    """A WAV file read as its bytes arrive: the header first, then PCM or float samples."""

    def __init__(self, field: str) -> None:
        self.field = field
        self.buffer = bytearray()
        self.rate = 0
        self.channels = 0
        self._code = ""  # numpy dtype of one sample, or "i3" for 24-bit
        self._width = 0
        self._remaining: int | None = None  # data bytes still to come; None = to the end
        self._in_data = False

    def _bad(self, why: str) -> UnsupportedMedia:
        return UnsupportedMedia(f"not a readable WAV file: {why}", field=self.field)

    def _parse_header(self) -> None:
        buf, pos = self.buffer, 12
        while pos + 8 <= len(buf):
            chunk_id, size = bytes(buf[pos : pos + 4]), struct.unpack_from("<I", buf, pos + 4)[0]
            if chunk_id == b"data":
                if not self._code:
                    raise self._bad("its data chunk comes before a 'fmt ' chunk")
                self._remaining = None if size in _OPEN_ENDED else size
                del buf[: pos + 8]
                self._in_data = True
                return
            end = pos + 8 + size + (size & 1)
            if end > len(buf):
                break  # the rest of this chunk has not arrived yet
            if chunk_id == b"fmt ":
                self._read_format(bytes(buf[pos + 8 : pos + 8 + size]))
            pos = end
        if len(buf) > _MAX_WAV_HEADER:
            raise self._bad(f"no data chunk in its first {_MAX_WAV_HEADER} bytes")

    def _read_format(self, fmt: bytes) -> None:
        if len(fmt) < 16:
            raise self._bad("its 'fmt ' chunk is too short")
        tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
        if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag leads its GUID
            tag = struct.unpack_from("<H", fmt, 24)[0]
        codes = {
            (1, 8): "u1",
            (1, 16): "<i2",
            (1, 24): "i3",
            (1, 32): "<i4",
            (3, 32): "<f4",
            (3, 64): "<f8",
        }
        if (tag, bits) not in codes:
            raise UnsupportedMedia(
                f"WAV sample format {tag}/{bits}-bit is not supported; use integer PCM or float",
                field=self.field,
            )
        if (
            channels < 1
            or not MIN_PCM_RATE // 2 <= rate <= 192_000
            or block_align != channels * bits // 8
        ):
            raise self._bad(
                f"its format says {channels} channels at {rate} Hz, block {block_align}"
            )
        self.rate, self.channels, self._width = rate, channels, bits // 8
        self._code = codes[(tag, bits)]

    def _samples(self, raw: bytes) -> np.ndarray:
        if self._code == "i3":  # 24-bit: widen each little-endian sample to int32
            b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
            values = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8) / 2.0**31
        elif self._code == "u1":
            values = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
        elif "f" in self._code:
            values = np.frombuffer(raw, self._code)
        else:
            values = np.frombuffer(raw, self._code) / float(2 ** (8 * self._width - 1))
        return _mono(values.astype(np.float32).reshape(-1, self.channels))

    def feed(self, data: bytes) -> np.ndarray:
        self.buffer += data
        if not self._in_data:
            self._parse_header()
            if not self._in_data:
                return np.zeros(0, np.float32)
        take = (
            len(self.buffer) if self._remaining is None else min(len(self.buffer), self._remaining)
        )
        take -= take % (self._width * self.channels)
        raw = bytes(self.buffer[:take])
        del self.buffer[:take]
        if self._remaining is not None:
            self._remaining -= take
            if self._remaining == 0:
                self.buffer.clear()  # chunks after the data (LIST, ...) are not audio
        return self._samples(raw)

    def finish(self) -> None:
        if not self._in_data:
            raise self._bad("it ends inside its header")
        if self._remaining:
            raise self._bad(
                f"it is truncated: {self._remaining} bytes of its data chunk are missing"
            )
        if self.buffer:
            raise self._bad("it ends in the middle of a sample")


class _Resampler:
    """Streaming resampler to 16 kHz mono (FFmpeg's swresample through PyAV)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._inner = (
            None
            if rate == WHISPER_RATE
            else av.AudioResampler(format="flt", layout="mono", rate=WHISPER_RATE)
        )

    def _frames(self, frames: list[av.AudioFrame]) -> np.ndarray:
        parts = [f.to_ndarray().reshape(-1) for f in frames]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def push(self, samples: np.ndarray) -> np.ndarray:
        if self._inner is None or not len(samples):
            return samples
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples).reshape(1, -1), format="flt", layout="mono"
        )
        frame.sample_rate = self.rate
        return self._frames(self._inner.resample(frame))

    def flush(self) -> np.ndarray:
        return (
            np.zeros(0, np.float32)
            if self._inner is None
            else self._frames(self._inner.resample(None))
        )


class AudioDecoder:
    """Bytes in (all at once or chunk by chunk), 16 kHz mono float32 out.

    encoding: "file" (WAV/FLAC/MP3/OGG, detected) or "pcm_s16le" (needs sample_rate_hz).
    field: the request field the audio came in, named in errors. Raises
    UnsupportedMedia for what cannot be decoded and OutOfRange past `max_seconds`.
    """

    def __init__(
        self,
        encoding: str,
        sample_rate_hz: int,
        *,
        field: str,
        max_seconds: float,
        rate_field: str = "config.sample_rate_hz",
    ) -> None:
        self.encoding, self.field, self.max_seconds = encoding, field, max_seconds
        self.kind: str | None = "pcm" if encoding == "pcm_s16le" else None
        self.bytes_in = 0
        self.samples_out = 0  # at 16 kHz
        self._head = bytearray()  # container bytes until the kind is known / the file is whole
        self._wav: _WavReader | None = None
        self._resampler: _Resampler | None = None
        if self.kind == "pcm":
            if not sample_rate_hz:
                raise InvalidArgument("raw PCM audio needs config.sample_rate_hz", field=rate_field)
            if not MIN_PCM_RATE <= sample_rate_hz <= MAX_PCM_RATE:
                raise OutOfRange(
                    f"sample_rate_hz must be {MIN_PCM_RATE}..{MAX_PCM_RATE}, got {sample_rate_hz}",
                    field=rate_field,
                )
            self._resampler = _Resampler(sample_rate_hz)
        elif encoding != "file":
            raise InvalidArgument(f"unknown audio encoding {encoding!r}", field="config.encoding")

    @property
    def seconds(self) -> float:
        return self.samples_out / WHISPER_RATE

    def _check_length(self, seconds: float) -> None:
        if seconds > self.max_seconds:
            raise OutOfRange(
                f"the audio is longer than the limit of {self.max_seconds:g} s",
                field=self.field,
                metadata={"max_seconds": f"{self.max_seconds:g}"},
            )

    def _out(self, samples: np.ndarray) -> np.ndarray:
        self.samples_out += len(samples)
        self._check_length(self.seconds)
        return samples

    def _start(self, rate: int) -> None:
        if self._resampler is None:
            self._resampler = _Resampler(rate)

    def feed(self, data: bytes) -> np.ndarray:
        """Samples decided by these bytes (maybe none yet)."""
        self.bytes_in += len(data)
        if self.kind == "pcm":
            self._head += data
            usable = len(self._head) - len(self._head) % 2
            samples = np.frombuffer(bytes(self._head[:usable]), "<i2").astype(np.float32) / 32768
            del self._head[:usable]
            return self._out(self._resampler.push(samples))
        if self.kind == "wav":
            return self._feed_wav(data)
        self._head += data
        if self.kind is None and len(self._head) >= 12:
            self.kind = sniff(bytes(self._head[:12]))
            if self.kind is None:
                raise UnsupportedMedia(
                    "the audio is not a WAV, FLAC, MP3 or OGG file; for raw PCM set "
                    "encoding AUDIO_ENCODING_PCM_S16LE and sample_rate_hz",
                    field=self.field,
                )
            if self.kind == "wav":
                self._wav = _WavReader(self.field)
                head, self._head = bytes(self._head), bytearray()
                return self._feed_wav(head)
        if len(self._head) > MAX_COMPRESSED_BYTES:
            raise OutOfRange(
                f"compressed audio is limited to {MAX_COMPRESSED_BYTES} bytes", field=self.field
            )
        return np.zeros(0, np.float32)

    def _feed_wav(self, data: bytes) -> np.ndarray:
        samples = self._wav.feed(data)
        if not self._wav.rate:
            return samples  # still in the header
        self._start(self._wav.rate)
        return self._out(self._resampler.push(samples))

    def finish(self) -> np.ndarray:
        """The rest, once every byte has arrived. Raises for empty or broken audio."""
        if not self.bytes_in:
            raise InvalidArgument("no audio was sent", field=self.field)
        decided = np.zeros(0, np.float32)
        if self.kind == "pcm":
            if self._head:
                raise UnsupportedMedia(
                    "s16le PCM must have an even number of bytes", field=self.field
                )
        elif self.kind == "wav":
            self._wav.finish()
        elif self.kind is None:
            raise UnsupportedMedia(
                f"{self.bytes_in} bytes are too few for an audio file", field=self.field
            )
        else:
            samples, rate = self._decode_container()
            self._start(rate)
            decided = self._out(self._resampler.push(samples))
        rest = np.concatenate([decided, self._out(self._resampler.flush())])
        if not self.samples_out:
            raise UnsupportedMedia("the audio holds no samples", field=self.field)
        return rest

    def _decode_container(self) -> tuple[np.ndarray, int]:
        try:
            with soundfile.SoundFile(io.BytesIO(bytes(self._head))) as file:
                # The header's length (an estimate for MP3): a long file fails before decoding.
                self._check_length(file.frames / file.samplerate)
                samples, rate = file.read(dtype="float32", always_2d=True), file.samplerate
        except (soundfile.LibsndfileError, RuntimeError, ValueError) as exc:
            raise UnsupportedMedia(
                f"could not decode the {self.kind.upper()} audio{media_detail(exc)}",
                field=self.field,
            ) from exc
        self._head.clear()
        if len(samples) < file.frames - rate // 10:  # e.g. an MP3 whose Xing header says more
            raise UnsupportedMedia(
                f"the {self.kind.upper()} audio is truncated: {len(samples)} of {file.frames} samples",
                field=self.field,
            )
        if not len(samples):
            raise UnsupportedMedia(
                f"the {self.kind.upper()} audio holds no samples", field=self.field
            )
        return _mono(samples), rate


def decode(
    data: bytes, encoding: str, sample_rate_hz: int, *, field: str, max_seconds: float
) -> np.ndarray:
    """A whole audio file (or PCM buffer) as 16 kHz mono float32."""
    decoder = AudioDecoder(encoding, sample_rate_hz, field=field, max_seconds=max_seconds)
    head = decoder.feed(data)
    return np.concatenate([head, decoder.finish()])


# ---- out ---------------------------------------------------------------------------


def wav_header(rate: int) -> bytes:
    """A mono s16le WAV header whose sizes say 'until the end': the audio follows in pieces."""
    return (
        b"RIFF"
        + struct.pack("<I", 0xFFFFFFFF)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", 0xFFFFFFFF)
    )


def to_s16le(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def to_ogg_vorbis(samples: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, np.clip(samples, -1.0, 1.0), rate, format="OGG", subtype="VORBIS")
    return out.getvalue()
