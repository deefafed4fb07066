"""Workflows: steps run in order, each step's output feeding the next step's input.

What a step produces (text, audio or an image) and what it takes is fixed per request
kind; `check` refuses a chain that does not fit before anything runs, and `feed` puts
the previous step's output into the next step's request when it is its turn.
"""

from __future__ import annotations

from collections.abc import Sequence

from aimesh.jobs.v1 import jobs_pb2 as pb
from aimesh.text.v1 import text_generation_pb2

from ..runtime.errors import InvalidArgument
from .store import WORKFLOW

__all__ = ["WORKFLOW", "check", "feed", "output"]

# What each kind's answer hands on (Embed answers end a chain).
PRODUCES = {"generate": "text", "recognize": "text", "describe_image": "text", "synthesize": "audio",
            "generate_image": "image", "transform_image": "image"}
# What each kind takes from the step before, and the field that must be left empty for it
# ("" : Generate appends a user message to its own).
TAKES = {"generate": ("text", ""), "embed": ("text", "texts"), "synthesize": ("text", "text"),
         "generate_image": ("text", "prompt"), "recognize": ("audio", "audio"),
         "describe_image": ("image", "image"), "transform_image": ("image", "image")}


def check(steps: Sequence[pb.JobRequest]) -> list[str]:
    """The kind of every step; InvalidArgument naming the step that does not fit."""
    kinds = []
    for index, step in enumerate(steps):
        kind = step.WhichOneof("request")
        if kind is None:
            raise InvalidArgument(f"steps[{index}] names no request", field=f"steps[{index}]")
        if index > 0:
            wanted, field = TAKES[kind]
            given = PRODUCES.get(kinds[-1])
            if given != wanted:
                raise InvalidArgument(
                    f"steps[{index}] ({kind}) takes {wanted}, but steps[{index - 1}] ({kinds[-1]}) "
                    f"{'hands on ' + given if given else 'ends a workflow'}", field=f"steps[{index}]")
            if field and getattr(getattr(step, kind), field):
                raise InvalidArgument(f"steps[{index}].{kind}.{field} comes from steps[{index - 1}]: "
                                      "leave it empty", field=f"steps[{index}].{kind}.{field}")
        kinds.append(kind)
    return kinds


def output(kind: str, response: pb.JobResponse) -> str | bytes:
    """What a step's answer hands on to the next step."""
    answer = getattr(response, kind)
    if kind == "generate":
        return answer.text
    if kind == "recognize":
        return answer.text
    if kind == "describe_image":
        return answer.caption or answer.text
    if kind == "synthesize":
        return b"".join(piece.audio_chunk for piece in answer.responses)
    images = [event.image.png for event in answer.responses if event.HasField("image")]
    if not images:
        raise ValueError(f"the {kind} step produced no image")
    return images[-1]


def feed(step: pb.JobRequest, previous_kind: str, previous: pb.JobResponse) -> pb.JobRequest:
    """The step's request with the previous step's output in its input field."""
    value = output(previous_kind, previous)
    out = pb.JobRequest()
    out.CopyFrom(step)
    kind = out.WhichOneof("request")
    request = getattr(out, kind)
    _, field = TAKES[kind]
    if kind == "generate":
        request.messages.add(role=text_generation_pb2.ROLE_USER, content=value)
    elif kind == "embed":
        request.texts.append(value)
    else:
        setattr(request, field, value)
    return out
