"""Every capability besides text through the real Envoy front door of `aimesh up`: the SDK
(sync and async), grpcurl (bytes as base64 JSON) and HTTP/JSON (server streams as SSE),
one bad input per capability over gRPC and HTTP, and the round trip text -> TTS -> STT.

Sizes stay tiny (64x64 images, 2-3 steps, one short sentence of speech) so the file
runs in about a minute once the shared mesh is up."""

from __future__ import annotations

import base64
import io
import json
import subprocess
from typing import Any

import aimesh
import httpx
import numpy as np
import pytest
from aimesh.client.embedding import vectors
from PIL import Image

from tests.conftest import VENV_BIN
from tests.images import LINES, encode, png_claiming, text_image
from tests.speech_audio import SENTENCES, read, words_in

IMAGE, STT, TTS = "tiny-sd", "whisper-base", "piper-joe-medium"
VISION, EMBEDDING = "tiny-blip-tesseract", "all-minilm-l6-v2"
VOICE, RATE = "en_US-joe-medium", 22050
TIMEOUT = 60
# One short sentence of the Piper voice, and words of it Whisper base heard in every trial
# (the voice samples noise: "brown" and "jumps" came back "round" and "jumped" at times).
SENTENCE = SENTENCES[0]
HEARD = {"fox", "lazy", "dog"}
# Text-to-image request shared by every surface: the same seed gives the same PNG bytes.
DRAW = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 3, "seed": 7}


# --- the three surfaces -------------------------------------------------------------------


def grpcurl(mesh, method: str, model: str, data: dict | list[dict]) -> tuple[list[dict], dict | None]:
    """Calls `method` through the front door (each message of `data` on stdin; a list is a
    client stream). Returns the JSON messages grpcurl printed and, when the call failed, its
    google.rpc.Status as JSON (`-format-error`), after checking the exit status is 64 + code."""
    messages = data if isinstance(data, list) else [data]
    done = subprocess.run(
        [str(VENV_BIN / "grpcurl"), "-plaintext", "-format-error", "-max-time", str(TIMEOUT),
         "-H", f"x-aimesh-model: {model}", "-d", "@", mesh.front, method],
        input="\n".join(json.dumps(m) for m in messages), capture_output=True, text=True,
        timeout=TIMEOUT + 10, check=False,
    )
    printed = _json_values(done.stdout)
    if done.returncode == 0:
        return printed, None
    (status,) = _json_values(done.stderr)
    assert done.returncode == 64 + status["code"], done.stderr
    return printed, status


def _json_values(text: str) -> list[dict]:
    """The JSON values grpcurl printed one after another (pretty-printed, not one a line)."""
    values, decoder, at = [], json.JSONDecoder(), 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return values
        value, at = decoder.raw_decode(text, at)
        values.append(value)


def post(mesh, model_verb: str, body: Any) -> httpx.Response:
    return httpx.post(f"http://{mesh.front}/v1/models/{model_verb}", json=body, timeout=TIMEOUT)


def sse(mesh, model_verb: str, body: Any) -> tuple[httpx.Response, list[dict]]:
    """A server stream over HTTP/JSON: the response and its `data: {...}` events."""
    url = f"http://{mesh.front}/v1/models/{model_verb}"
    with httpx.Client(timeout=TIMEOUT) as http, http.stream("POST", url, json=body) as response:
        lines = list(response.iter_lines())
    assert response.status_code == 200, "\n".join(lines)
    assert response.headers["content-type"] == "text/event-stream"
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert all(not line or line.startswith("data: ") for line in lines), lines
    return response, events


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error_info(status: dict) -> dict:
    """The ErrorInfo of a google.rpc.Status as JSON (HTTP body or grpcurl -format-error)."""
    infos = [d for d in status["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    assert len(infos) == 1, status
    assert infos[0]["domain"] == "aimesh.dev"
    return infos[0]


def png_size(png: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(png))
    image.load()  # decodes every pixel, not only the header
    assert image.format == "PNG"
    return image.size


def kinds(events: list) -> list[str]:
    """Which oneof each image event holds: SDK messages or HTTP/grpcurl JSON."""
    return [e.WhichOneof("event") if not isinstance(e, dict) else next(iter(e)) for e in events]


# --- image generation and image-to-image ----------------------------------------------------


@pytest.fixture(scope="module")
def drawn(mesh) -> bytes:
    """The DRAW image through the sync SDK, checked event by event."""
    with aimesh.Client(mesh.front, timeout=TIMEOUT) as client:
        events = list(client.image.generate_image(IMAGE, **DRAW))
    assert kinds(events) == ["progress"] * 3 + ["image", "result"]
    assert [e.progress.step for e in events[:3]] == [1, 2, 3]
    assert {e.progress.total_steps for e in events[:3]} == {3}
    image = events[3].image
    assert (image.width, image.height, image.seed) == (64, 64, 7)
    assert png_size(image.png) == (64, 64)
    result = events[-1].result
    assert result.usage.unit == "image_steps" and result.usage.output_units == 3
    assert result.served_by.model == IMAGE and result.served_by.random_weights
    return image.png


def test_image_sdk_generates_and_transforms(mesh, drawn):
    with aimesh.Client(mesh.front, timeout=TIMEOUT) as client:
        events = list(client.image.transform_image(IMAGE, drawn, "the same lighthouse at night",
                                                   strength=0.7, steps=3, seed=1))
    # img2img runs int(steps x strength) steps and keeps the input's size.
    assert kinds(events) == ["progress"] * 2 + ["image", "result"]
    assert events[0].progress.total_steps == 2
    assert png_size(events[2].image.png) == (64, 64) and events[2].image.png != drawn
    assert events[-1].result.served_by.random_weights


def test_image_grpcurl_streams_progress_then_the_same_png(mesh, drawn):
    events, error = grpcurl(mesh, "aimesh.image.v1.ImageGenerationService/GenerateImage", IMAGE, DRAW)
    assert error is None
    assert kinds(events) == ["progress"] * 3 + ["image", "result"]
    assert [e["progress"]["step"] for e in events[:3]] == [1, 2, 3]
    image = events[3]["image"]
    assert base64.b64decode(image["png"]) == drawn, "same seed and parameters, same PNG bytes"
    assert (image["width"], image["height"], image["seed"]) == (64, 64, "7")  # int64 is a JSON string
    assert events[-1]["result"]["served_by"]["random_weights"] is True


def test_image_http_sse_generate_and_transform(mesh, drawn):
    response, events = sse(mesh, f"{IMAGE}:generateImage", DRAW)
    assert response.headers["x-aimesh-served-model"] == IMAGE
    assert response.headers["x-aimesh-random-weights"] == "true"
    progress = [e["progress"] for e in events if "progress" in e]
    assert len(progress) == DRAW["steps"] and [p["step"] for p in progress] == [1, 2, 3]
    assert kinds(events) == ["progress"] * 3 + ["image", "result"]
    assert base64.b64decode(events[3]["image"]["png"]) == drawn

    _, moved = sse(mesh, f"{IMAGE}:transformImage",
                   {"image": b64(drawn), "prompt": "at night", "strength": 0.7, "steps": 3, "seed": 1,
                    "previews": True})
    assert kinds(moved) == ["progress"] * 2 + ["image", "result"]
    # Previews are the latents seen through a cheap VAE approximation: 64x64 / 8.
    assert all(png_size(base64.b64decode(e["progress"]["preview_png"])) == (8, 8) for e in moved[:2])
    assert png_size(base64.b64decode(moved[2]["image"]["png"])) == (64, 64)
    assert moved[-1]["result"]["usage"]["output_units"] == 2


def test_image_bad_input_over_grpc_and_http_then_a_good_call(mesh):
    with aimesh.Client(mesh.front, timeout=TIMEOUT) as client:
        with pytest.raises(aimesh.InvalidArgumentError) as caught:
            list(client.image.transform_image(IMAGE, b"\x89PNG but not really", "x", steps=2))
        assert caught.value.reason == "UNSUPPORTED_MEDIA" and caught.value.metadata["field"] == "image"
        bad = post(mesh, f"{IMAGE}:generateImage", {**DRAW, "width": 100})
        assert bad.status_code == 400 and bad.json()["code"] == 3
        info = error_info(bad.json())
        assert info["reason"] == "INVALID_FIELD" and info["metadata"] == {"field": "width"}
        assert "multiple of 8" in bad.json()["message"]
        good = list(client.image.generate_image(IMAGE, "fine", width=64, height=64, steps=2, seed=1))
    assert kinds(good) == ["progress"] * 2 + ["image", "result"]


# --- text-to-speech and speech-to-text ------------------------------------------------------


@pytest.fixture(scope="module")
def spoken(mesh) -> bytes:
    """SENTENCE spoken by the Piper voice through the front door (sync SDK), as one WAV file."""
    with aimesh.Client(mesh.front, timeout=TIMEOUT) as client:
        pieces = list(client.tts.synthesize(TTS, SENTENCE))
    assert [p.text for p in pieces[:-1]] == [SENTENCE]
    assert pieces[0].audio_chunk[:4] == b"RIFF" and pieces[0].sample_rate_hz == RATE
    last = pieces[-1]
    assert not last.audio_chunk and last.served_by.model == TTS and not last.served_by.random_weights
    wav = b"".join(p.audio_chunk for p in pieces)
    samples, rate = read(wav)
    assert rate == RATE and last.usage.output_units == pytest.approx(len(samples) / rate, abs=0.01)
    assert last.usage.unit == "characters" and last.usage.input_units == len(SENTENCE)
    return wav


def test_round_trip_text_to_speech_to_text_through_envoy(mesh, spoken):
    with aimesh.Client(mesh.front, timeout=TIMEOUT) as client:
        heard = client.stt.recognize(STT, spoken)
    assert HEARD <= words_in(heard.text), heard.text
    assert heard.language == "en" and heard.served_by.model == STT and heard.served_by.pool == "local"
    assert heard.usage.unit == "audio_seconds"
    assert heard.usage.input_units == pytest.approx(len(read(spoken)[0]) / RATE, abs=0.01)


async def test_stt_bidi_streaming_recognize_through_envoy(mesh, spoken):
    chunk = 8 * 1024  # ~0.19 s of 22,050 Hz audio per message

    async def chunks():
        for at in range(0, len(spoken), chunk):
            yield spoken[at:at + chunk]

    async with aimesh.AsyncClient(mesh.front, timeout=TIMEOUT) as client:
        replies = [r async for r in client.stt.streaming_recognize(STT, chunks(), language="en")]
    segments = [r.segment for r in replies if r.HasField("segment")]
    assert segments and HEARD <= words_in("".join(s.text for s in segments)), segments
    last = replies[-1]
    assert not last.HasField("segment") and last.language == "en" and last.served_by.model == STT
    assert last.usage.input_units == pytest.approx(len(read(spoken)[0]) / RATE, abs=0.01)


def test_stt_grpcurl_recognize_and_streaming_recognize_with_base64_audio(mesh, spoken):
    (out,), error = grpcurl(mesh, "aimesh.speech.v1.SpeechToTextService/Recognize", STT,
                            {"audio": b64(spoken), "config": {"language": "en"}})
    assert error is None and HEARD <= words_in(out["text"]), out
    assert out["segments"] and out["segments"][0]["start"] == "0s"
    assert out["served_by"]["model"] == STT
    # A client stream: one JSON message after another on stdin, config first.
    half = len(spoken) // 2
    replies, error = grpcurl(mesh, "aimesh.speech.v1.SpeechToTextService/StreamingRecognize", STT,
                             [{"config": {"language": "en"}}, {"audio_chunk": b64(spoken[:half])},
                              {"audio_chunk": b64(spoken[half:])}])
    assert error is None and HEARD <= words_in("".join(r["segment"]["text"] for r in replies[:-1]))
    assert replies[-1]["usage"]["unit"] == "audio_seconds"


def test_stt_http_recognize_and_streaming_recognize(mesh, spoken):
    unary = post(mesh, f"{STT}:recognize", {"audio": b64(spoken)})
    assert unary.status_code == 200 and unary.headers["x-aimesh-served-model"] == STT
    assert HEARD <= words_in(unary.json()["text"]) and unary.json()["language"] == "en"
    # A client stream over HTTP/JSON is a JSON array of messages; the replies come back as SSE.
    half = len(spoken) // 2
    _, events = sse(mesh, f"{STT}:streamingRecognize",
                    [{"config": {"language": "en"}}, {"audio_chunk": b64(spoken[:half])},
                     {"audio_chunk": b64(spoken[half:])}])
    assert HEARD <= words_in("".join(e["segment"]["text"] for e in events if "segment" in e))
    assert events[-1]["usage"]["unit"] == "audio_seconds" and "segment" not in events[-1]


def test_stt_bad_input_over_grpc_and_http_then_a_good_call(mesh, spoken):
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    with aimesh.Client(mesh.front, timeout=TIMEOUT) as client:
        with pytest.raises(aimesh.InvalidArgumentError) as caught:
            client.stt.recognize(STT, png)
        assert caught.value.reason == "UNSUPPORTED_MEDIA" and caught.value.metadata["field"] == "audio"
        with pytest.raises(aimesh.InvalidArgumentError) as streamed:
            list(client.stt.streaming_recognize(STT, [spoken], language="klingon"))
        assert streamed.value.reason == "INVALID_FIELD"
        assert streamed.value.metadata["field"] == "config.language"
        bad = post(mesh, f"{STT}:recognize", {"audio": b64(spoken), "config": {"language": "xx"}})
        assert bad.status_code == 400
        assert error_info(bad.json())["reason"] == "INVALID_FIELD"
        assert error_info(bad.json())["metadata"]["field"] == "config.language"
        good = client.stt.recognize(STT, spoken[:len(spoken) // 2])
    assert "fox" in words_in(good.text), good.text


async def test_tts_list_voices_over_sdk_and_http(mesh):
    async with aimesh.AsyncClient(mesh.front, timeout=TIMEOUT) as client:
        voices = (await client.tts.list_voices(TTS)).voices
    assert [(v.id, list(v.languages), v.sample_rate_hz) for v in voices] == [(VOICE, ["en"], RATE)]
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        listed = await http.get(f"http://{mesh.front}/v1/models/{TTS}:listVoices")
    assert listed.status_code == 200
    assert listed.json() == {"voices": [{"id": VOICE, "languages": ["en"], "sample_rate_hz": RATE}]}


def test_tts_grpcurl_synthesize_streams_wav(mesh):
    pieces, error = grpcurl(mesh, "aimesh.speech.v1.TextToSpeechService/Synthesize", TTS,
                            {"text": "Good morning. Good night.", "voice": VOICE})
    assert error is None and [p.get("text") for p in pieces[:-1]] == ["Good morning.", "Good night."]
    wav = b"".join(base64.b64decode(p.get("audio_chunk", "")) for p in pieces)
    samples, rate = read(wav)
    assert rate == RATE
    assert len(samples) / rate == pytest.approx(pieces[-1]["usage"]["output_units"], abs=0.01)


def test_tts_http_synthesize_as_sse_decodes_to_audio_at_the_declared_rate(mesh):
    text = "Hello from the mesh. This is the second sentence."
    response, events = sse(mesh, f"{TTS}:synthesize", {"text": text, "format": "OUTPUT_FORMAT_WAV"})
    assert response.headers["x-aimesh-served-model"] == TTS
    assert [e["text"] for e in events[:-1]] == ["Hello from the mesh.", "This is the second sentence."]
    assert {e["sample_rate_hz"] for e in events} == {RATE}
    wav = b"".join(base64.b64decode(e["audio_chunk"]) for e in events)
    samples, rate = read(wav)
    assert rate == RATE
    assert len(samples) / rate == pytest.approx(events[-1]["usage"]["output_units"], abs=0.01)
    assert np.abs(samples).max() > 0.1, "speech, not silence"
    assert events[-1]["audio_chunk"] == "" and events[-1]["usage"]["input_units"] == len(text)

    # Raw PCM: 16-bit samples at the declared rate, no header.
    _, raw = sse(mesh, f"{TTS}:synthesize", {"text": "Short.", "format": "OUTPUT_FORMAT_PCM_S16LE"})
    pcm = b"".join(base64.b64decode(e["audio_chunk"]) for e in raw)
    assert pcm[:4] != b"RIFF" and len(pcm) % 2 == 0
    seconds = len(pcm) / 2 / raw[0]["sample_rate_hz"]
    assert seconds == pytest.approx(raw[-1]["usage"]["output_units"], abs=0.01)


def test_tts_bad_input_over_grpc_and_http_then_a_good_call(mesh):
    with aimesh.Client(mesh.front, timeout=TIMEOUT) as client:
        with pytest.raises(aimesh.AimeshError) as caught:
            list(client.tts.synthesize(TTS, "Hi.", speed=10.0))
        assert caught.value.code.name == "OUT_OF_RANGE" and caught.value.reason == "INVALID_FIELD"
        assert caught.value.metadata["field"] == "speed"
        unknown = post(mesh, f"{TTS}:synthesize", {"text": "Hi.", "voice": "en_GB-nobody"})
        assert unknown.status_code == 404
        assert error_info(unknown.json())["reason"] == "MODEL_NOT_FOUND"
        assert error_info(unknown.json())["metadata"]["available"] == VOICE
        empty = post(mesh, f"{TTS}:synthesize", {"text": " ... "})
        assert empty.status_code == 400 and error_info(empty.json())["metadata"]["field"] == "text"
        good = list(client.tts.synthesize(TTS, "Fine.", format="pcm_s16le"))
    assert good[0].audio_chunk and good[-1].usage.output_units > 0.2


# --- image-to-text ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def printed() -> tuple[bytes, dict]:
    image, boxes = text_image()
    return encode(image, "PNG"), boxes


def test_vision_sdk_ocr_reads_the_words(mesh, printed):
    png, boxes = printed
    with aimesh.Client(mesh.front, timeout=TIMEOUT) as client:
        out = client.vision.describe_image(VISION, png, tasks=["ocr"])
        both = client.vision.describe_image(VISION, png, tasks=["caption", "ocr"])
    assert out.text == "\n".join(LINES) and [w.text for w in out.words] == " ".join(LINES).split()
    for word in out.words:  # each box where the word was drawn, give or take a few pixels
        x0, y0, x1, _ = boxes[word.text]
        assert abs(word.box.x - x0) <= 6 and abs(word.box.y - y0) <= 10
        assert abs(word.box.x + word.box.width - x1) <= 6
    assert out.caption == "" and not out.served_by.random_weights, "OCR alone is real"
    assert both.text == out.text and both.caption.strip() and both.served_by.random_weights


def test_vision_grpcurl_ocr_with_base64_image(mesh, printed):
    (out,), error = grpcurl(mesh, "aimesh.vision.v1.ImageToTextService/DescribeImage", VISION,
                            {"image": b64(printed[0]), "tasks": ["TASK_OCR"]})
    assert error is None and out["text"] == "\n".join(LINES)
    assert [w["text"] for w in out["words"]] == " ".join(LINES).split()


def test_vision_http_ocr(mesh, printed):
    out = post(mesh, f"{VISION}:describeImage", {"image": b64(printed[0]), "tasks": ["TASK_OCR"],
                                                  "ocr_language": "eng"})
    assert out.status_code == 200 and out.headers["x-aimesh-random-weights"] == "false"
    body = out.json()
    assert body["text"] == "\n".join(LINES) and body["caption"] == ""
    assert {"Hello", "aimesh", "Invoice", "2024", "42"} <= {w["text"] for w in body["words"]}
    assert all(0.5 < w["confidence"] <= 1 for w in body["words"])
    assert body["usage"] == {"unit": "images", "input_units": 1, "output_units": 0}


def test_vision_bad_input_over_grpc_and_http_then_a_good_call(mesh, printed):
    with aimesh.Client(mesh.front, timeout=TIMEOUT) as client:
        with pytest.raises(aimesh.AimeshError) as caught:
            client.vision.describe_image(VISION, png_claiming(6000, 6000), tasks=["ocr"])
        assert caught.value.code.name == "OUT_OF_RANGE" and caught.value.reason == "INVALID_FIELD"
        assert caught.value.metadata["field"] == "image"
        bad = post(mesh, f"{VISION}:describeImage", {"image": b64(b"not an image at all")})
        assert bad.status_code == 400 and error_info(bad.json())["reason"] == "UNSUPPORTED_MEDIA"
        language = post(mesh, f"{VISION}:describeImage",
                        {"image": b64(printed[0]), "ocr_language": "klingon"})
        assert language.status_code == 400
        assert error_info(language.json())["metadata"]["field"] == "ocr_language"
        good = client.vision.describe_image(VISION, printed[0], tasks=["ocr"])
    assert good.text.startswith("Hello aimesh")


# --- embeddings ---------------------------------------------------------------------------

RELATED = ["A man is eating food.", "A man is eating a piece of bread."]
UNRELATED = "The stock market fell sharply on Tuesday."


@pytest.fixture(scope="module")
async def embedded(mesh) -> np.ndarray:
    """The three texts' vectors through the async SDK."""
    async with aimesh.AsyncClient(mesh.front, timeout=TIMEOUT) as client:
        out = await client.embedding.embed(EMBEDDING, [*RELATED, UNRELATED], normalize=True)
    assert out.dimensions == 384 and out.served_by.model == EMBEDDING and out.usage.unit == "tokens"
    return np.array(vectors(out), dtype=np.float32)


def test_embedding_sdk_related_texts_are_closer(embedded):
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)
    assert embedded[0] @ embedded[1] > 0.6
    assert max(embedded[0] @ embedded[2], embedded[1] @ embedded[2]) < 0.2


def test_embedding_grpcurl_gives_the_sdk_vectors(mesh, embedded):
    (out,), error = grpcurl(mesh, "aimesh.embedding.v1.EmbeddingService/Embed", EMBEDDING,
                            {"texts": [*RELATED, UNRELATED], "normalize": True})
    assert error is None and out["dimensions"] == 384
    got = np.array([e["values"] for e in out["embeddings"]], dtype=np.float32)
    np.testing.assert_allclose(got, embedded, atol=1e-6)


def test_embedding_http_gives_the_sdk_vectors(mesh, embedded):
    out = post(mesh, f"{EMBEDDING}:embed", {"texts": [*RELATED, UNRELATED], "normalize": True})
    assert out.status_code == 200 and out.headers["x-aimesh-served-model"] == EMBEDDING
    body = out.json()
    got = np.array([e["values"] for e in body["embeddings"]], dtype=np.float32)
    np.testing.assert_allclose(got, embedded, atol=1e-6)
    assert body["usage"]["unit"] == "tokens" and body["usage"]["input_units"] > 10


def test_embedding_bad_input_over_grpc_grpcurl_and_http_then_a_good_call(mesh):
    with aimesh.Client(mesh.front, timeout=TIMEOUT) as client:
        with pytest.raises(aimesh.InvalidArgumentError) as caught:
            client.embedding.embed(EMBEDDING, ["fine", "   "])
        assert caught.value.reason == "INVALID_FIELD" and caught.value.metadata["field"] == "texts[1]"
        printed, status = grpcurl(mesh, "aimesh.embedding.v1.EmbeddingService/Embed", EMBEDDING,
                                  {"texts": []})
        assert not printed and status is not None and status["code"] == 3  # INVALID_ARGUMENT
        info = error_info(status)
        assert info["reason"] == "INVALID_FIELD" and info["metadata"] == {"field": "texts"}
        bad = post(mesh, f"{EMBEDDING}:embed", {"texts": ["fine", ""]})
        assert bad.status_code == 400 and error_info(bad.json())["metadata"] == {"field": "texts[1]"}
        # A body the transcoder cannot turn into the message: 400 before any server sees it.
        wrong_type = post(mesh, f"{EMBEDDING}:embed", {"texts": [42]})
        assert wrong_type.status_code == 400 and "texts" in wrong_type.text
        good = client.embedding.embed(EMBEDDING, ["fine"])
    assert good.dimensions == 384 and len(good.embeddings[0].values) == 384


# --- every capability ---------------------------------------------------------------------


@pytest.mark.parametrize(("verb", "body", "available"), [
    ("generateImage", {"prompt": "x"}, IMAGE),
    ("transformImage", {"prompt": "x"}, IMAGE),
    ("recognize", {}, STT),
    ("streamingRecognize", [{"config": {}}], STT),
    ("synthesize", {"text": "x"}, TTS),
    ("describeImage", {}, VISION),
    ("embed", {"texts": ["x"]}, EMBEDDING),
])
def test_http_unknown_model_names_the_models_of_that_capability(mesh, verb, body, available):
    out = post(mesh, f"no-such-model:{verb}", body)
    assert out.status_code == 404
    info = error_info(out.json())
    assert info["reason"] == "MODEL_NOT_FOUND" and info["metadata"]["available"] == available
