"""The text engine's batch scheduler and text assembly, with the real SmolLM2, no gRPC."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from aimesh_servers.models import builtin
from aimesh_servers.text.engine import TextAssembler, TextEngine
from aimesh_servers.text.request import GenerationChunk, GenerationRequest
from aimesh_servers.text.settings import TextSettings
from transformers import AutoTokenizer

SOURCE = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(builtin.resolve(SOURCE))


@pytest.fixture(scope="module")
def engine():
    # Small prefill chunks, so a long prompt is prefilled over several scheduler rounds.
    # One torch thread: on a loaded test machine two spin-waiting OpenMP threads make
    # every step several times slower.
    engine = TextEngine(SOURCE, threads=1, settings=TextSettings(max_batch=8, prefill_chunk=16))
    engine.load()
    yield engine
    engine.close()


def until(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def assemble(tokenizer, text: str, stops: tuple[str, ...]) -> list[GenerationChunk]:
    assembler = TextAssembler(tokenizer, stops, prompt_tokens=5)
    pieces = [p for t in tokenizer.encode(text) if (p := assembler.push(t)) is not None]
    if not assembler.done:
        pieces.append(assembler.finish("length"))
    return pieces


def test_assembly_gives_the_text_back_piece_by_piece_multi_byte_characters_whole(tokenizer):
    text = "Paris is lovely 🌍🎉 in spring — naïve café."
    pieces = assemble(tokenizer, text, ())
    assert "".join(p.text for p in pieces) == text
    assert all("\ufffd" not in p.text for p in pieces)
    assert len(pieces) > 5
    assert pieces[-1].finish_reason == "length"
    assert pieces[-1].completion_tokens == len(tokenizer.encode(text))


def test_assembly_stops_before_a_stop_sequence_split_across_tokens(tokenizer):
    pieces = assemble(tokenizer, "one two three END OF STORY four five", ("END OF", "zzz"))
    assert "".join(p.text for p in pieces) == "one two three "
    assert pieces[-1].finish_reason == "stop_sequence"
    # Text that could still grow into a stop sequence is held back, then released.
    pieces = assemble(tokenizer, "one two END three", ("END OF",))
    assert "".join(p.text for p in pieces) == "one two END three"


def run_alone(engine: TextEngine, request: GenerationRequest) -> str:
    return "".join(c.text for c in engine.stream(request, threading.Event()))


def test_sequences_of_very_different_lengths_decode_together_as_they_do_alone(engine):
    story = " ".join(f"Sentence {i} of the story is about a red fox and a brown dog." for i in range(12))
    requests = [
        GenerationRequest([("user", "Say hello.")], max_tokens=24),
        GenerationRequest([("user", f"{story} Summarize the story.")], max_tokens=24),  # ~200 tokens
        GenerationRequest([("system", "Answer briefly."), ("user", "What is 2 + 2?")], max_tokens=24),
        GenerationRequest([("user", "Name a fruit.")], max_tokens=24, temperature=1.0, seed=3),
    ]
    alone = [run_alone(engine, r) for r in requests]
    together: list[str | None] = [None] * len(requests)

    def run(i: int) -> None:
        together[i] = run_alone(engine, requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    until(lambda: engine.scheduler.active >= 3, "the sequences shared the batch")
    for t in threads:
        t.join(timeout=300)
    assert together == alone
    assert engine.scheduler.active == 0


def test_setting_the_cancel_event_drops_the_sequence_and_stops_its_work(engine):
    """The contract runtime.streams.iterate_in_thread relies on."""
    cancel = threading.Event()
    pieces: queue.Queue[GenerationChunk] = queue.Queue()

    def consume() -> None:
        for chunk in engine.stream(GenerationRequest([("user", "Write a long story.")], 1000), cancel):
            pieces.put(chunk)

    worker = threading.Thread(target=consume)
    worker.start()
    for _ in range(3):
        pieces.get(timeout=120)
    cancel.set()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the stream did not end after its cancel event was set"
    until(lambda: engine.scheduler.active == 0, "the sequence left the batch")
    before = engine.tokens_generated
    time.sleep(0.5)  # the scheduler is idle: nothing may be generated meanwhile
    assert engine.tokens_generated == before


def test_a_long_prompt_and_max_tokens_one(engine):
    chunks = list(engine.stream(GenerationRequest([("user", "Hi there, " * 60)], max_tokens=1),
                                threading.Event()))
    assert chunks[-1].finish_reason in ("length", "stop")
    assert chunks[-1].completion_tokens == 1
    assert chunks[-1].prompt_tokens > 120
