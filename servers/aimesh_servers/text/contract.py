"""Between the aimesh.text.v1 messages and the engines' GenerationRequest/GenerationChunk.

Shared by every TextGenerationService servicer (local model, cloud provider), so they
read requests and shape answers identically. No torch, no gRPC.
"""

from __future__ import annotations

from aimesh.common.v1 import common_pb2
from aimesh.text.v1 import text_generation_pb2 as pb

from .request import GenerationChunk, GenerationRequest

FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE,
}
ROLE_NAMES = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}


def generation_request(
    req: pb.GenerateRequest | pb.StreamGenerateRequest, default_max_tokens: int
) -> GenerationRequest:
    return GenerationRequest(
        messages=[(ROLE_NAMES.get(m.role, "unspecified"), m.content) for m in req.messages],
        max_tokens=req.max_tokens if req.HasField("max_tokens") else default_max_tokens,
        temperature=req.temperature if req.HasField("temperature") else 0.0,
        top_p=req.top_p if req.HasField("top_p") else 1.0,
        stop=tuple(req.stop),
        seed=req.seed if req.HasField("seed") else None,
    )


def _usage(last: GenerationChunk) -> pb.TokenUsage:
    return pb.TokenUsage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens)


def generate_response(
    parts: list[str], last: GenerationChunk, served: common_pb2.ServedBy
) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text="".join(parts), finish_reason=FINISH[last.finish_reason], usage=_usage(last),
        served_by=served,
    )


def stream_response(
    chunk: GenerationChunk, served: common_pb2.ServedBy, first: bool
) -> pb.StreamGenerateResponse:
    """served_by goes in the first and the last message; finish and usage in the last."""
    if chunk.finish_reason is None:
        return pb.StreamGenerateResponse(text_delta=chunk.text, served_by=served if first else None)
    return pb.StreamGenerateResponse(
        text_delta=chunk.text, finish_reason=FINISH[chunk.finish_reason], usage=_usage(chunk),
        served_by=served,
    )
