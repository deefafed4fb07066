"""Workflow chains: what fits is checked before anything runs; each step is fed the
output of the one before."""

from __future__ import annotations

import pytest
from aimesh.client.jobs import job_request
from aimesh.embedding.v1.embedding_pb2 import EmbedRequest
from aimesh.image.v1.image_generation_pb2 import (
    GeneratedImage,
    GenerateImageRequest,
    GenerateImageResponse,
)
from aimesh.jobs.v1 import jobs_pb2 as pb
from aimesh.speech.v1.speech_to_text_pb2 import RecognizeRequest, RecognizeResponse
from aimesh.speech.v1.text_to_speech_pb2 import SynthesizeRequest, SynthesizeResponse
from aimesh.text.v1.text_generation_pb2 import GenerateRequest, GenerateResponse
from aimesh.vision.v1.image_to_text_pb2 import DescribeImageRequest, DescribeImageResponse
from aimesh_servers.jobs import workflow
from aimesh_servers.runtime.errors import InvalidArgument


def steps(*requests):
    return [job_request(r) for r in requests]


def test_chains_that_fit_are_accepted() -> None:
    assert workflow.check(steps(GenerateRequest(model="t"), SynthesizeRequest(model="s"),
                                RecognizeRequest(model="r"), EmbedRequest(model="e"))) == \
        ["generate", "synthesize", "recognize", "embed"]
    assert workflow.check(steps(GenerateImageRequest(model="i", prompt="a cat"), DescribeImageRequest(model="v"),
                                SynthesizeRequest(model="s"))) == ["generate_image", "describe_image", "synthesize"]


@pytest.mark.parametrize(("chain", "field"), [
    ((GenerateRequest(), RecognizeRequest()), "steps[1]"),  # text into a step that takes audio
    ((EmbedRequest(), GenerateRequest()), "steps[1]"),  # embeddings end a chain
    ((GenerateRequest(), SynthesizeRequest(text="given")), "steps[1].synthesize.text"),  # filled by the chain
    ((GenerateRequest(), pb.JobRequest()), "steps[1]"),  # an empty step
])
def test_chains_that_do_not_fit_are_refused_naming_the_step(chain, field) -> None:
    with pytest.raises(InvalidArgument) as refused:
        workflow.check(steps(*chain))
    assert refused.value.field == field


def test_each_step_takes_the_output_of_the_one_before() -> None:
    said = pb.JobResponse(generate=GenerateResponse(text="hello there"))
    fed = workflow.feed(job_request(SynthesizeRequest(model="s")), "generate", said)
    assert fed.synthesize.text == "hello there" and fed.synthesize.model == "s"
    chat = workflow.feed(job_request(GenerateRequest(model="t")), "recognize",
                         pb.JobResponse(recognize=RecognizeResponse(text="what is this")))
    assert chat.generate.messages[-1].content == "what is this"
    audio = pb.JobResponse(synthesize=pb.SynthesizeResponses(responses=[
        SynthesizeResponse(audio_chunk=b"RIFF"), SynthesizeResponse(audio_chunk=b"data")]))
    assert workflow.feed(job_request(RecognizeRequest()), "synthesize", audio).recognize.audio == b"RIFFdata"
    image = pb.JobResponse(generate_image=pb.GenerateImageResponses(responses=[
        GenerateImageResponse(image=GeneratedImage(png=b"first")), GenerateImageResponse(image=GeneratedImage(png=b"png"))]))
    assert workflow.feed(job_request(DescribeImageRequest()), "generate_image", image).describe_image.image == b"png"
    caption = pb.JobResponse(describe_image=DescribeImageResponse(caption="", text="OCR words"))
    assert workflow.feed(job_request(EmbedRequest()), "describe_image", caption).embed.texts == ["OCR words"]
    with pytest.raises(ValueError):
        workflow.feed(job_request(DescribeImageRequest()), "generate_image",
                      pb.JobResponse(generate_image=pb.GenerateImageResponses()))
