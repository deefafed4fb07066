"""TextToSpeechService: converts requests, calls TtsEngine, streams audio sentence by sentence."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from aimesh.common.v1 import common_pb2
from aimesh.speech.v1 import text_to_speech_pb2 as pb
from aimesh.speech.v1 import text_to_speech_pb2_grpc as pb_grpc

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
from .tts_engine import SynthesisRequest, TtsEngine

FORMATS = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: "wav",
    pb.OUTPUT_FORMAT_WAV: "wav",
    pb.OUTPUT_FORMAT_PCM_S16LE: "pcm_s16le",
    pb.OUTPUT_FORMAT_OGG: "ogg",
}


class TextToSpeechServicer(EngineServicer, pb_grpc.TextToSpeechServiceServicer):
    service = pb.DESCRIPTOR.services_by_name["TextToSpeechService"]
    register = staticmethod(pb_grpc.add_TextToSpeechServiceServicer_to_server)
    engine: TtsEngine

    async def Synthesize(
        self, request: pb.SynthesizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SynthesizeResponse]:
        asked = requested_model(request.model, context)
        served = served_by(
            resolve_model(self.models, asked, request.model_version), self.pool, asked
        )
        if request.format not in FORMATS:
            raise InvalidArgument(f"unknown output format {request.format}", field="format")
        synthesis = SynthesisRequest(
            text=request.text,
            voice=request.voice,
            language=request.language,
            speed=request.speed if request.HasField("speed") else 1.0,
            format=FORMATS[request.format],
        )
        self.engine.validate(synthesis)  # fail before any header is sent
        await send_served_by(context, served)
        seconds, rate = 0.0, self.engine.voice(synthesis.voice).sample_rate
        with tracing.stage("tts.synthesize", characters=len(synthesis.text)) as stage:
            async for piece in iterate_in_thread(lambda cancel: self.engine.stream(synthesis, cancel)):
                seconds += piece.seconds
                stage.set(audio_s=round(seconds, 3))
                yield pb.SynthesizeResponse(
                    audio_chunk=piece.audio, sample_rate_hz=rate, text=piece.text
                )
        yield pb.SynthesizeResponse(
            sample_rate_hz=rate,
            served_by=served,
            usage=common_pb2.Usage(
                unit="characters", input_units=len(synthesis.text), output_units=round(seconds, 3)
            ),
        )

    async def ListVoices(
        self, request: pb.ListVoicesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListVoicesResponse:
        resolve_model(self.models, requested_model(request.model, context))
        return pb.ListVoicesResponse(
            voices=[
                pb.Voice(id=v.id, languages=[v.language], sample_rate_hz=v.sample_rate)
                for v in self.engine.voices.values()
            ]
        )
