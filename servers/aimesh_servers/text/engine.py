"""Text generation on transformers, with no gRPC in sight.

`TextEngine.stream` is a blocking generator of text pieces as the model produces
tokens. It runs `model.generate` in a worker thread with a streamer that hands token
ids over a queue, and a stopping criterion that checks a cancel event after every
token: setting the event (the caller went away) stops the forward passes themselves.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from ..models import builtin
from ..runtime.errors import OutOfRange
from .request import (
    EngineLimits,
    GenerationChunk,
    GenerationRequest,
    longest_stop_prefix,
    validate_request,
)


class _TokenQueue(BaseStreamer):
    """Receives token ids from `generate` (the prompt first, then one step at a time)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[list[int] | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


@dataclass
class TextEngine:
    source: str
    limits: EngineLimits = field(default_factory=EngineLimits)
    threads: int = 2
    # Tokens generated over the engine's life: observable proof that work stops on cancel.
    tokens_generated: int = 0

    def load(self) -> None:
        torch.set_num_threads(self.threads)
        path = builtin.resolve(self.source)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self._count_lock = threading.Lock()

    def validate(self, request: GenerationRequest) -> None:
        validate_request(request, self.limits)

    def _prompt_ids(self, request: GenerationRequest) -> torch.Tensor:
        messages = [{"role": role, "content": content} for role, content in request.messages]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        if ids.shape[-1] > self.limits.max_prompt_tokens:
            raise OutOfRange(
                f"the prompt is {ids.shape[-1]} tokens; the limit is {self.limits.max_prompt_tokens}",
                field="messages",
            )
        return ids

    def stream(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[GenerationChunk]:
        """Yields text as it is decided; the last chunk has finish_reason and counts."""
        self.validate(request)
        prompt_ids = self._prompt_ids(request)
        streamer = _TokenQueue()
        kwargs: dict[str, object] = dict(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=request.max_tokens,
            streamer=streamer,
            stopping_criteria=[_Cancelled(cancel)],
            pad_token_id=self.tokenizer.eos_token_id,
        )
        if request.temperature > 0:
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    if request.seed is not None:
                        torch.manual_seed(request.seed)
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced to the caller below
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name="generate", daemon=True)
        worker.start()
        try:
            yield from self._decode(streamer, request, prompt_ids.shape[-1], cancel)
        finally:
            cancel.set()  # also when the consumer stops early: end the forward passes
            worker.join()
        if failure and not isinstance(failure[0], GeneratorExit):
            raise failure[0]

    def _decode(
        self, streamer: _TokenQueue, request: GenerationRequest, prompt_tokens: int,
        cancel: threading.Event,
    ) -> Iterator[GenerationChunk]:
        tokens: list[int] = []
        sent = 0  # characters of the decoded text already yielded
        finish = "length"
        while (step := streamer.queue.get()) is not None:
            with self._count_lock:
                self.tokens_generated += len(step)
            if step[-1] in self.eos_ids:
                finish = "stop"
                break
            tokens.extend(step)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
                continue
            hit = min((i for s in request.stop if (i := text.find(s, max(0, sent - len(s)))) >= 0),
                      default=-1)
            if hit >= 0:
                finish = "stop_sequence"
                if hit > sent:
                    yield GenerationChunk(text[sent:hit])
                break
            # Hold back a tail that could still grow into a stop sequence.
            safe = len(text) - longest_stop_prefix(text, request.stop)
            if safe > sent:
                yield GenerationChunk(text[sent:safe])
                sent = safe
        cancel.set()
        if finish != "stop_sequence":  # flush the held-back tail
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if len(text) > sent:
                yield GenerationChunk(text[sent:])
        yield GenerationChunk("", finish, prompt_tokens, len(tokens) + (finish == "stop"))

