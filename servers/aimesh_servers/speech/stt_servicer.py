"""SpeechToTextService: converts requests, runs SttEngine sessions, streams segments back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from aimesh.common.v1 import common_pb2
from aimesh.speech.v1 import speech_to_text_pb2 as pb
from aimesh.speech.v1 import speech_to_text_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2

from ..runtime.errors import InvalidArgument
from ..runtime.service import (
    EngineServicer,
    requested_model,
    resolve_model,
    send_served_by,
    served_by,
)
from ..runtime import tracing
from ..runtime.streams import iterate_in_thread
from .stt_engine import RecognitionOptions, RecognitionSession, Segment, SttEngine

ENCODINGS = {
    pb.AUDIO_ENCODING_UNSPECIFIED: "file",
    pb.AUDIO_ENCODING_FILE: "file",
    pb.AUDIO_ENCODING_PCM_S16LE: "pcm_s16le",
}


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def _segment(segment: Segment) -> pb.Segment:
    return pb.Segment(
        text=segment.text,
        start=_duration(segment.start),
        end=_duration(segment.end),
        words=[
            pb.Word(
                text=w.text,
                start=_duration(w.start),
                end=_duration(w.end),
                probability=w.probability,
            )
            for w in segment.words
        ],
    )


def _usage(session: RecognitionSession) -> common_pb2.Usage:
    return common_pb2.Usage(unit="audio_seconds", input_units=round(session.seconds, 3))


class SpeechToTextServicer(EngineServicer, pb_grpc.SpeechToTextServiceServicer):
    service = pb.DESCRIPTOR.services_by_name["SpeechToTextService"]
    register = staticmethod(pb_grpc.add_SpeechToTextServiceServicer_to_server)
    engine: SttEngine

    def _session(self, config: pb.RecognitionConfig, field: str) -> RecognitionSession:
        if config.encoding not in ENCODINGS:
            raise InvalidArgument(
                f"unknown audio encoding {config.encoding}", field="config.encoding"
            )
        options = RecognitionOptions(
            encoding=ENCODINGS[config.encoding],
            sample_rate_hz=config.sample_rate_hz,
            language=config.language,
            word_timestamps=config.word_timestamps,
        )
        return self.engine.session(options, field=field)

    def _served(
        self, model: str, version: str, context: grpc.aio.ServicerContext
    ) -> common_pb2.ServedBy:
        asked = requested_model(model, context)
        return served_by(resolve_model(self.models, asked, version), self.pool, asked)

    async def Recognize(
        self, request: pb.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecognizeResponse:
        served = self._served(request.model, request.model_version, context)
        session = self._session(request.config, "audio")
        await asyncio.to_thread(session.load, request.audio)  # broken audio fails before any header
        await send_served_by(context, served)
        with tracing.stage("stt.transcribe", audio_s=round(session.seconds, 3)):
            segments = [s async for s in iterate_in_thread(session.recognize)]
        return pb.RecognizeResponse(
            text="".join(s.text for s in segments).strip(),
            segments=[_segment(s) for s in segments],
            language=session.language,
            usage=_usage(session),
            served_by=served,
        )

    async def StreamingRecognize(
        self,
        requests: AsyncIterator[pb.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamingRecognizeResponse]:
        first = await anext(aiter(requests), None)
        if first is None:
            raise InvalidArgument(
                "the stream ended before its first message (the config)", field="config"
            )
        if not first.HasField("config"):
            raise InvalidArgument("the first message must carry the config", field="config")
        served = self._served(first.model, first.model_version, context)
        session = self._session(first.config, "audio_chunk")
        await send_served_by(context, served)

        async def chunks() -> AsyncIterator[bytes]:
            yield first.audio_chunk
            async for request in requests:
                yield request.audio_chunk

        async for chunk in chunks():
            if chunk and await asyncio.to_thread(session.feed, chunk):
                with tracing.stage("stt.window", audio_s=round(session.seconds, 3)):
                    async for segment in iterate_in_thread(session.decide):
                        yield pb.StreamingRecognizeResponse(
                            segment=_segment(segment), language=session.language
                        )
        with tracing.stage("stt.final_window", audio_s=round(session.seconds, 3)):
            async for segment in iterate_in_thread(session.finish):
                yield pb.StreamingRecognizeResponse(
                    segment=_segment(segment), language=session.language
                )
        yield pb.StreamingRecognizeResponse(
            language=session.language, usage=_usage(session), served_by=served
        )
