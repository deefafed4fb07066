"""Speech: `client.stt.recognize(...)`, `client.stt.streaming_recognize(...)`,
`client.tts.synthesize(...)` and `client.tts.list_voices(...)`."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from pathlib import Path

from ..speech.v1 import speech_to_text_pb2 as stt_pb
from ..speech.v1 import speech_to_text_pb2_grpc as stt_grpc
from ..speech.v1 import text_to_speech_pb2 as tts_pb
from ..speech.v1 import text_to_speech_pb2_grpc as tts_grpc
from .transport import AsyncTransport, Transport

#: Audio: the bytes of a WAV/FLAC/MP3/OGG file (or raw PCM), or a path to a file.
AudioLike = bytes | str | os.PathLike
#: How audio bytes are encoded: "file" (detected), "pcm_s16le", or an AudioEncoding value.
EncodingLike = str | int
#: Synthesized audio format: "wav", "pcm_s16le", "ogg", or an OutputFormat value.
FormatLike = str | int
_ENCODINGS = {"file": stt_pb.AUDIO_ENCODING_FILE, "pcm_s16le": stt_pb.AUDIO_ENCODING_PCM_S16LE}
_FORMATS = {
    "wav": tts_pb.OUTPUT_FORMAT_WAV,
    "pcm_s16le": tts_pb.OUTPUT_FORMAT_PCM_S16LE,
    "ogg": tts_pb.OUTPUT_FORMAT_OGG,
}


def _enum(value: str | int, names: dict[str, int], what: str) -> int:
    if isinstance(value, str):
        if value not in names:
            raise ValueError(f"{what} must be one of {', '.join(names)}, got {value!r}")
        return names[value]
    return value


def _config(
    encoding: EncodingLike, sample_rate_hz: int, language: str, word_timestamps: bool
) -> stt_pb.RecognitionConfig:
    return stt_pb.RecognitionConfig(
        encoding=_enum(encoding, _ENCODINGS, "encoding"),
        sample_rate_hz=sample_rate_hz,
        language=language,
        word_timestamps=word_timestamps,
    )


def _recognize_request(
    model: str, audio: AudioLike, config: stt_pb.RecognitionConfig, model_version: str
) -> stt_pb.RecognizeRequest:
    data = audio if isinstance(audio, bytes) else Path(audio).read_bytes()
    return stt_pb.RecognizeRequest(
        model=model, model_version=model_version, config=config, audio=data
    )


def _stream_requests(
    model: str, config: stt_pb.RecognitionConfig, chunks: Iterable[bytes], model_version: str
) -> Iterator[stt_pb.StreamingRecognizeRequest]:
    yield stt_pb.StreamingRecognizeRequest(model=model, model_version=model_version, config=config)
    for chunk in chunks:
        yield stt_pb.StreamingRecognizeRequest(audio_chunk=chunk)


async def _async_stream_requests(
    model: str,
    config: stt_pb.RecognitionConfig,
    chunks: Iterable[bytes] | AsyncIterable[bytes],
    model_version: str,
) -> AsyncIterator[stt_pb.StreamingRecognizeRequest]:
    yield stt_pb.StreamingRecognizeRequest(model=model, model_version=model_version, config=config)
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield stt_pb.StreamingRecognizeRequest(audio_chunk=chunk)
    else:
        for chunk in chunks:
            yield stt_pb.StreamingRecognizeRequest(audio_chunk=chunk)


def _synthesize_request(
    model: str,
    text: str,
    voice: str,
    language: str,
    speed: float | None,
    format: FormatLike,
    model_version: str,
) -> tts_pb.SynthesizeRequest:
    request = tts_pb.SynthesizeRequest(
        model=model,
        model_version=model_version,
        text=text,
        voice=voice,
        language=language,
        format=_enum(format, _FORMATS, "format"),
    )
    if speed is not None:
        request.speed = speed
    return request


class SpeechToTextClient:
    """Blocking speech-to-text."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._stub = stt_grpc.SpeechToTextServiceStub(transport.channel)

    def recognize(
        self,
        model: str,
        audio: AudioLike,
        *,
        encoding: EncodingLike = "file",
        sample_rate_hz: int = 0,
        language: str = "",
        word_timestamps: bool = False,
        model_version: str = "",
        timeout: float | None = None,
    ) -> stt_pb.RecognizeResponse:
        """The transcript of a whole file: `response.text`, `.segments`, `.language`, `.usage`.
        Raw PCM needs encoding="pcm_s16le" and sample_rate_hz; language "" detects it."""
        request = _recognize_request(
            model,
            audio,
            _config(encoding, sample_rate_hz, language, word_timestamps),
            model_version,
        )
        return self._t.unary(self._stub.Recognize, request, model=model, timeout=timeout)

    def streaming_recognize(
        self,
        model: str,
        chunks: Iterable[bytes],
        *,
        encoding: EncodingLike = "file",
        sample_rate_hz: int = 0,
        language: str = "",
        word_timestamps: bool = False,
        model_version: str = "",
        timeout: float | None = None,
    ) -> Iterator[stt_pb.StreamingRecognizeResponse]:
        """Sends `chunks` as they come and yields segments as the server decides them; the
        last message has no segment but `usage` and `served_by`."""
        requests = _stream_requests(
            model,
            _config(encoding, sample_rate_hz, language, word_timestamps),
            chunks,
            model_version,
        )
        return self._t.stream(self._stub.StreamingRecognize, requests, model=model, timeout=timeout)


class AsyncSpeechToTextClient:
    """Awaitable speech-to-text (same methods as SpeechToTextClient; chunks may be an async iterable)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport
        self._stub = stt_grpc.SpeechToTextServiceStub(transport.channel)

    async def recognize(
        self,
        model: str,
        audio: AudioLike,
        *,
        encoding: EncodingLike = "file",
        sample_rate_hz: int = 0,
        language: str = "",
        word_timestamps: bool = False,
        model_version: str = "",
        timeout: float | None = None,
    ) -> stt_pb.RecognizeResponse:
        request = _recognize_request(
            model,
            audio,
            _config(encoding, sample_rate_hz, language, word_timestamps),
            model_version,
        )
        return await self._t.unary(self._stub.Recognize, request, model=model, timeout=timeout)

    def streaming_recognize(
        self,
        model: str,
        chunks: Iterable[bytes] | AsyncIterable[bytes],
        *,
        encoding: EncodingLike = "file",
        sample_rate_hz: int = 0,
        language: str = "",
        word_timestamps: bool = False,
        model_version: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[stt_pb.StreamingRecognizeResponse]:
        requests = _async_stream_requests(
            model,
            _config(encoding, sample_rate_hz, language, word_timestamps),
            chunks,
            model_version,
        )
        return self._t.stream(self._stub.StreamingRecognize, requests, model=model, timeout=timeout)


class TextToSpeechClient:
    """Blocking text-to-speech."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._stub = tts_grpc.TextToSpeechServiceStub(transport.channel)

    def synthesize(
        self,
        model: str,
        text: str,
        *,
        voice: str = "",
        language: str = "",
        speed: float | None = None,
        format: FormatLike = "wav",
        model_version: str = "",
        timeout: float | None = None,
    ) -> Iterator[tts_pb.SynthesizeResponse]:
        """Audio pieces sentence by sentence (`.audio_chunk`, `.text`); joined, the WAV or PCM
        pieces make one file (OGG: one file per piece). The last message carries `usage`."""
        request = _synthesize_request(model, text, voice, language, speed, format, model_version)
        return self._t.stream(self._stub.Synthesize, request, model=model, timeout=timeout)

    def list_voices(self, model: str, *, timeout: float | None = None) -> tts_pb.ListVoicesResponse:
        request = tts_pb.ListVoicesRequest(model=model)
        return self._t.unary(self._stub.ListVoices, request, model=model, timeout=timeout)


class AsyncTextToSpeechClient:
    """Awaitable text-to-speech (same methods as TextToSpeechClient)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport
        self._stub = tts_grpc.TextToSpeechServiceStub(transport.channel)

    def synthesize(
        self,
        model: str,
        text: str,
        *,
        voice: str = "",
        language: str = "",
        speed: float | None = None,
        format: FormatLike = "wav",
        model_version: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[tts_pb.SynthesizeResponse]:
        request = _synthesize_request(model, text, voice, language, speed, format, model_version)
        return self._t.stream(self._stub.Synthesize, request, model=model, timeout=timeout)

    async def list_voices(
        self, model: str, *, timeout: float | None = None
    ) -> tts_pb.ListVoicesResponse:
        request = tts_pb.ListVoicesRequest(model=model)
        return await self._t.unary(self._stub.ListVoices, request, model=model, timeout=timeout)
