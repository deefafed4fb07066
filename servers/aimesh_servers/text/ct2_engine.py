"""Text generation on CTranslate2 int8 (`AIMESH_TEXT_ENGINE=ctranslate2`): micro-batches
with a join window.

CTranslate2 cannot add a sequence to a running batch, so calls are grouped instead: the
first waiting call opens a batch, calls arriving within `join_window_ms` of it join
(up to `max_batch`, and only calls with the same sampling: temperature and top_p are
per batch in CTranslate2), and the batch runs as one `generate_batch`. Its per-token
callback hands each token to its caller as soon as it is decided and stops a row whose
caller left (cancelled, or a stop sequence seen by the assembler), its max_tokens
reached or its end token. With `batches_in_flight` > 1, that many batches generate at
once (CTranslate2's inter_threads, the cores split between them), so a late arrival
starts its own batch instead of waiting for a whole running one.

Gap: `seed` has no effect here. CTranslate2 4.8 has only a process-wide
`set_random_seed`, which each of its threads reads once, so a sampled call cannot be
made to repeat (greedy calls, temperature 0, are deterministic).

The model is converted offline at first load (int8 weights, into the model cache).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

# Intel MKL's int8 GEMM, CTranslate2's default on Intel CPUs, made SmolLM2's greedy answers
# nonsense on this machine's Xeon (AVX-512 VNNI); oneDNN's matched float32 (README, Text
# serving). Read when the library loads: set before the import.
os.environ.setdefault("CT2_USE_MKL", "0")

import ctranslate2
from ctranslate2.converters import TransformersConverter
from transformers import AutoTokenizer, GenerationConfig

from ..models import builtin
from ..runtime.errors import NotReady
from .engine import TextEngine
from .request import GenerationRequest
from .scheduler import Emit, Finished

log = logging.getLogger(__name__)

QUANTIZATION = "int8"


def converted(source: str) -> Path:
    """The int8 CTranslate2 copy of a transformers checkpoint, converted once into the cache."""
    path = builtin.resolve(source)
    digest = hashlib.sha256(str(Path(path).resolve() if Path(path).exists() else path).encode()).hexdigest()
    name = f"ct2-{QUANTIZATION}-{Path(path).name}-{digest[:12]}"
    return builtin._cached(name, lambda out: TransformersConverter(path).convert(
        str(out), quantization=QUANTIZATION, force=True))


def _send(call: _Call, event: int | Finished) -> None:
    try:
        call.emit(event)
    except Exception:  # noqa: BLE001 - its consumer is gone (a closed event loop): stop working for it
        call.cancel.set()


@dataclass(eq=False)
class _Call:
    tokens: list[str]  # the prompt, as the model's vocabulary strings
    request: GenerationRequest
    cancel: threading.Event
    emit: Emit
    arrived: float = field(default_factory=time.monotonic)
    generated: int = 0
    finished: bool = False

    @property
    def sampling(self) -> tuple[float, float]:
        """Calls batch together only with the same (CTranslate2: per batch) sampling."""
        if self.request.temperature == 0:
            return (0.0, 1.0)
        return (self.request.temperature, self.request.top_p)

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        if not self.finished:
            self.finished = True
            _send(self, Finished(reason, error))


@dataclass
class _Tally:
    tokens: int = 0


@dataclass
class MicroBatcher:
    """Groups waiting calls into batches and runs them on `generator`, `workers` at once."""

    generator: ctranslate2.Generator
    eos_ids: frozenset[int]
    max_batch: int
    join_window_s: float
    workers: int
    tally: _Tally = field(default_factory=_Tally)
    _waiting: deque[_Call] = field(default_factory=deque)
    _batches: list[list[_Call]] = field(default_factory=list)  # generating now
    _wake: threading.Condition = field(default_factory=threading.Condition)
    _stopping: bool = False
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def tokens_generated(self) -> int:
        """Over the batcher's life: proof that work stops on cancel."""
        return self.tally.tokens

    def start(self) -> None:
        for i in range(self.workers):
            thread = threading.Thread(target=self._loop, name=f"ct2-batch-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        for thread in self._threads:
            thread.join()
        for call in self._waiting:
            call.finish("error", NotReady("the text engine has stopped"))

    def submit(self, call: _Call) -> None:
        with self._wake:
            if self._stopping:
                raise NotReady("the text engine has stopped")
            self._waiting.append(call)
            self._wake.notify()

    @property
    def active(self) -> int:
        """Calls waiting for a batch, or in one and not finished (a cancelled row stops at
        its next token, before its batch ends)."""
        with self._wake:
            return len(self._waiting) + sum(not c.finished for b in self._batches for c in b)

    def _next_batch(self) -> list[_Call] | None:
        """Waits for a call, then out its join window; the batch it opens. None: stopping."""
        with self._wake:
            while True:
                for call in [c for c in self._waiting if c.cancel.is_set()]:
                    self._waiting.remove(call)
                    call.finish("cancelled")
                if self._stopping:
                    return None
                if not self._waiting:
                    self._wake.wait()
                    continue
                first = self._waiting[0]
                window_left = first.arrived + self.join_window_s - time.monotonic()
                same = sum(c.sampling == first.sampling for c in self._waiting)
                if window_left > 0 and same < self.max_batch:
                    self._wake.wait(window_left)
                    continue
                batch = [c for c in self._waiting if c.sampling == first.sampling][: self.max_batch]
                for call in batch:
                    self._waiting.remove(call)
                self._batches.append(batch)
                return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._generate(batch)
            except Exception as exc:  # its callers get the error; the batcher carries on
                log.exception("text generation batch failed")
                for call in batch:
                    call.finish("error", exc)
            finally:
                with self._wake:
                    self._batches.remove(batch)

    def _generate(self, batch: list[_Call]) -> None:
        temperature, top_p = batch[0].sampling
        eos_ids, tally = self.eos_ids, self.tally

        # Refers to neither the batcher nor the generator: CTranslate2 may drop the callback
        # on one of its own threads, and a generator freed there joins that thread (abort).
        def on_token(step: ctranslate2.GenerationStepResult) -> bool:
            """Called by CTranslate2 for each row's new token; True stops that row."""
            call = batch[step.batch_id]
            if call.finished:
                return True
            if call.cancel.is_set():
                call.finish("cancelled")
                return True
            call.generated += 1
            tally.tokens += 1
            if step.token_id in eos_ids:
                call.finish("stop")
                return True
            _send(call, step.token_id)
            if call.generated >= call.request.max_tokens:
                call.finish("length")
                return True
            return False

        self.generator.generate_batch(
            [call.tokens for call in batch],
            max_length=max(call.request.max_tokens for call in batch),
            include_prompt_in_result=False,
            end_token=[*self.eos_ids],
            sampling_topk=1 if temperature == 0 else 0,
            sampling_temperature=temperature or 1.0,
            sampling_topp=top_p,
            callback=on_token,
        )
        for call in batch:  # CTranslate2 ended the row itself: its end token, or max_length
            call.finish("length" if call.generated >= call.request.max_tokens else "stop")


@dataclass
class CT2TextEngine(TextEngine):
    """TextEngine's interface and text assembly, generation by CTranslate2 micro-batches."""

    @property
    def tokens_generated(self) -> int:
        return self.batcher.tokens_generated

    def load(self) -> None:
        folder = converted(self.source)
        path = builtin.resolve(self.source)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        workers = self.settings.batches_in_flight
        self.generator = ctranslate2.Generator(
            str(folder), device="cpu", compute_type=QUANTIZATION,
            inter_threads=workers, intra_threads=max(1, self.threads // workers),
        )
        eos = GenerationConfig.from_pretrained(path).eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.batcher = MicroBatcher(
            self.generator, frozenset(eos_ids), self.settings.max_batch,
            self.settings.join_window_ms / 1000, workers,
        )
        self.batcher.start()

    def close(self) -> None:
        self.batcher.stop()
        self.generator.unload_model()  # its memory now, on this thread

    def _submit(self, prompt: list[int], request: GenerationRequest, cancel: threading.Event,
                emit: Emit) -> None:
        self.batcher.submit(_Call(self.tokenizer.convert_ids_to_tokens(prompt), request, cancel, emit))
