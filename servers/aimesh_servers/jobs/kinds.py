"""What each JobRequest case is: its capability, the front door's gRPC method that runs
it, and its request and response messages."""

from __future__ import annotations

from dataclasses import dataclass

from aimesh.embedding.v1 import embedding_pb2
from aimesh.image.v1 import image_generation_pb2
from aimesh.jobs.v1 import jobs_pb2
from aimesh.speech.v1 import speech_to_text_pb2, text_to_speech_pb2
from aimesh.text.v1 import text_generation_pb2
from aimesh.vision.v1 import image_to_text_pb2
from google.protobuf.message import Message

from ..tenancy.plans import SERVICES


@dataclass(frozen=True)
class Kind:
    name: str  # the JobRequest / JobResponse oneof case
    capability: str  # scope short name (tenancy/plans.py)
    method: str
    request: type[Message]
    response: type[Message]  # one message of the call's answer
    streaming: bool = False  # a server stream: the JobResponse keeps every message

    @property
    def path(self) -> str:
        return f"/{SERVICES[self.capability]}/{self.method}"


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("generate", "text", "Generate", text_generation_pb2.GenerateRequest,
         text_generation_pb2.GenerateResponse),
    Kind("embed", "embedding", "Embed", embedding_pb2.EmbedRequest, embedding_pb2.EmbedResponse),
    Kind("generate_image", "image", "GenerateImage", image_generation_pb2.GenerateImageRequest,
         image_generation_pb2.GenerateImageResponse, streaming=True),
    Kind("transform_image", "image", "TransformImage", image_generation_pb2.TransformImageRequest,
         image_generation_pb2.TransformImageResponse, streaming=True),
    Kind("synthesize", "tts", "Synthesize", text_to_speech_pb2.SynthesizeRequest,
         text_to_speech_pb2.SynthesizeResponse, streaming=True),
    Kind("recognize", "stt", "Recognize", speech_to_text_pb2.RecognizeRequest,
         speech_to_text_pb2.RecognizeResponse),
    Kind("describe_image", "vision", "DescribeImage", image_to_text_pb2.DescribeImageRequest,
         image_to_text_pb2.DescribeImageResponse),
)}


def job_response(kind: Kind, messages: list[bytes]) -> jobs_pb2.JobResponse:
    """The JobResponse of a call's answer (one message, or every message of a stream)."""
    out = jobs_pb2.JobResponse()
    field = getattr(out, kind.name)
    if kind.streaming:
        for raw in messages:
            field.responses.add().ParseFromString(raw)
    else:
        field.ParseFromString(messages[0])
    return out
