"""Text generation on transformers, with no gRPC in sight.

Every call is one sequence of the engine's `BatchScheduler` (scheduler.py), which
decodes all of them together, step by step. `TextEngine.astream` (async, for the
servicer) and `TextEngine.stream` (blocking, with the `threading.Event` cancel contract
of `runtime.streams.iterate_in_thread`) turn a sequence's token ids into text pieces,
applying stop sequences; leaving either early cancels the sequence, and the scheduler
drops it before its next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..models import builtin
from ..runtime.errors import OutOfRange
from .request import (
    EngineLimits,
    GenerationChunk,
    GenerationRequest,
    longest_stop_prefix,
    validate_request,
)
from .scheduler import BatchScheduler, Emit, Finished, Sampling, Sequence
from .settings import TextSettings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TextAssembler:
    """Token ids of one sequence in, text pieces out: incremental detokenization (only
    the last few tokens are decoded again), stop sequences (text held back while it could
    still grow into one), usage counts on every piece."""

    def __init__(self, tokenizer: object, stops: tuple[str, ...], prompt_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self._prefix = 0  # tokens[_prefix:_read] decode to the end of `text`
        self._read = 0
        self.done = False

    def _chunk(self, text: str, finish: str | None = None, extra: int = 0) -> GenerationChunk:
        return GenerationChunk(text, finish, self.prompt_tokens, len(self.tokens) + extra)

    def _decode_new(self, final: bool = False) -> None:
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.tokens[self._prefix:], skip_special_tokens=True)
        # A trailing U+FFFD is half a multi-byte character: wait for the rest.
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)

    def push(self, token: int) -> GenerationChunk | None:
        """The piece a new token adds, if any; the last one when a stop sequence is hit."""
        self.tokens.append(token)
        self._decode_new()
        longest = max((len(s) for s in self.stops), default=0)
        hits = [i for s in self.stops if (i := self.text.find(s, max(0, self.sent - longest))) >= 0]
        if hits:
            self.done = True
            return self._chunk(self.text[self.sent:min(hits)], "stop_sequence")
        safe = len(self.text) - longest_stop_prefix(self.text, self.stops)
        if safe > self.sent:
            piece, self.sent = self.text[self.sent:safe], safe
            return self._chunk(piece)
        return None

    def finish(self, reason: str) -> GenerationChunk:
        """The last piece: the held-back tail, the finish reason and the counts (an
        end-of-sequence token counts as a completion token, as transformers counts it)."""
        self.done = True
        self._decode_new(final=True)
        return self._chunk(self.text[self.sent:], reason, extra=reason == "stop")


@dataclass
class TextEngine:
    source: str
    limits: EngineLimits = field(default_factory=EngineLimits)
    threads: int = 2
    settings: TextSettings = field(default_factory=TextSettings)

    @property
    def capacity(self) -> int:
        """Sequences that decode together; calls beyond it wait for a free slot."""
        return self.settings.max_batch

    @property
    def tokens_generated(self) -> int:
        """Tokens decided over the engine's life: observable proof that work stops on cancel."""
        return self.scheduler.tokens_generated

    def load(self) -> None:
        torch.set_num_threads(self.threads)
        path = builtin.resolve(self.source)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[self.settings.dtype])
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.scheduler = BatchScheduler(
            self.model, frozenset(eos_ids), capacity=self.capacity,
            prefill_chunk=self.settings.prefill_chunk,
        )
        self.scheduler.start()

    def close(self) -> None:
        self.scheduler.stop()

    def validate(self, request: GenerationRequest) -> None:
        validate_request(request, self.limits)

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        messages = [{"role": role, "content": content} for role, content in request.messages]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        if len(ids) > self.limits.max_prompt_tokens:
            raise OutOfRange(
                f"the prompt is {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens}",
                field="messages",
            )
        return list(ids)

    def _submit(self, prompt: list[int], request: GenerationRequest, cancel: threading.Event,
                emit: Emit) -> None:
        """Hands a call to the batcher: its tokens, then one Finished, come through `emit`."""
        self.scheduler.submit(Sequence(
            prompt, request.max_tokens,
            Sampling(request.temperature, request.top_p, request.seed), cancel, emit,
        ))

    def _start(self, request: GenerationRequest, cancel: threading.Event,
               emit: Emit) -> TextAssembler:
        self.validate(request)
        prompt = self._prompt_ids(request)
        self._submit(prompt, request, cancel, emit)
        return TextAssembler(self.tokenizer, request.stop, len(prompt))

    @staticmethod
    def _pieces(assembler: TextAssembler, event: int | Finished) -> Iterator[GenerationChunk]:
        if isinstance(event, Finished):
            if event.error is not None:
                raise event.error
            yield assembler.finish(event.reason)
        elif (piece := assembler.push(event)) is not None:
            yield piece

    def stream(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[GenerationChunk]:
        """Blocking: yields text as it is decided; the last chunk has finish_reason and counts.
        Setting `cancel` (or leaving the generator) drops the sequence from the batch."""
        events: queue.Queue[int | Finished] = queue.Queue()
        assembler = self._start(request, cancel, events.put)
        try:
            while not assembler.done:
                yield from self._pieces(assembler, events.get())
        finally:
            cancel.set()

    async def astream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """The same as `stream`, on the event loop: no thread per call."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[int | Finished] = asyncio.Queue()
        cancel = threading.Event()
        assembler = self._start(
            request, cancel, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            while not assembler.done:
                for piece in self._pieces(assembler, await events.get()):
                    yield piece
        finally:
            cancel.set()
