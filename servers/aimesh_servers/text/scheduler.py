"""Continuous batching: one scheduler thread per text engine runs the decode steps of
every active sequence at once.

Each running sequence owns a row of a key/value buffer per layer (`SlotCache`), with
its own length. A decode step feeds one token per row, with per-row positions and a
mask that hides each row's unused tail, so sequences of any length share one forward
pass. A new sequence is prefilled alone, in chunks between decode steps, with an
ordinary `DynamicCache`, then copied into a row; a finished or cancelled sequence
leaves at the next step and its row goes to the next one (the buffer shrinks when the
batch empties). Each token is handed to its sequence's `emit` as soon as it is decided.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..runtime import tracing
from ..runtime.errors import NotReady

log = logging.getLogger(__name__)

_LENGTH_STEP = 128  # key/value buffer lengths are multiples of this


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Finished:
    """The last event of a sequence: why it ended (`stop` = end-of-sequence token,
    `length`, `cancelled`), or the error that ended it."""

    reason: str
    error: BaseException | None = None


# Called from the scheduler thread: a token id, then one Finished.
Emit = Callable[[int | Finished], None]


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    cancel: threading.Event
    emit: Emit
    generator: torch.Generator | None = None
    generated: int = 0
    prefilled: int = 0  # prompt tokens already through the model
    prefill_cache: DynamicCache | None = None
    next_token: int = 0  # the token the next decode step feeds
    # Spans of its stages (prefill, decode) in its call's trace; made where the call submits it.
    stages: tracing.Stages | tracing.NoStages = field(default_factory=tracing.stages)

    def __post_init__(self) -> None:
        if self.sampling.temperature > 0:
            # Per sequence, never the global RNG: concurrent seeded calls stay reproducible.
            self.generator = torch.Generator()
            if self.sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.sampling.seed)


class SlotCache:
    """Keys and values of the running sequences: row i of each layer's
    [rows, kv_heads, length, head_dim] buffer belongs to `lengths[i]` tokens of sequence i.
    Rows stay packed (0..n-1): a sequence leaving gets the last row moved into its place.
    Passed to the model as its cache for a decode step (`update` is the Cache protocol)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.shape = (kv_heads, head_dim)
        self.layers, self.dtype = layers, dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []
        self._positions = torch.zeros(0, dtype=torch.long)
        self._span = 0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _reserve(self, rows: int, length: int) -> None:
        have_rows = self.keys[0].shape[0] if self.keys else 0
        have_length = self.keys[0].shape[2] if self.keys else 0
        if rows <= have_rows and length <= have_length:
            return
        # Grown geometrically: sequences joining one by one, or growing token by token,
        # reallocate a few times, not at every step.
        rows = max(rows, 2 * have_rows)
        length = max(-(-length // _LENGTH_STEP) * _LENGTH_STEP, have_length + have_length // 2)
        for buffers in (self.keys, self.values):
            for i in range(self.layers):
                grown = torch.zeros((rows, self.shape[0], length, self.shape[1]), dtype=self.dtype)
                if i < len(buffers):
                    old = buffers[i]
                    grown[: old.shape[0], :, : old.shape[2]] = old
                    buffers[i] = grown
                else:
                    buffers.append(grown)

    def add(self, prefill: DynamicCache, length: int) -> None:
        """A prefilled sequence joins as the last row."""
        self._reserve(self.rows + 1, length + 1)
        row = self.rows
        for i, layer in enumerate(prefill.layers):
            self.keys[i][row, :, :length] = layer.keys[0]
            self.values[i][row, :, :length] = layer.values[0]
        self.lengths.append(length)

    def remove(self, row: int) -> None:
        last = self.rows - 1
        if row != last:
            for buffers in (self.keys, self.values):
                for buffer in buffers:
                    buffer[row, :, : self.lengths[last]] = buffer[last, :, : self.lengths[last]]
            self.lengths[row] = self.lengths[last]
        self.lengths.pop()
        if not self.lengths:  # an idle engine holds no key/value memory
            self.keys, self.values = [], []

    def begin_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [rows, 1] of the tokens this step feeds, and the attention mask
        [rows, 1, 1, span]: each row sees its own tokens and the new one, nothing more."""
        self._span = max(self.lengths) + 1
        self._reserve(self.rows, self._span)
        self._positions = torch.tensor(self.lengths, dtype=torch.long)
        mask = torch.arange(self._span)[None, :] <= self._positions[:, None]
        return self._positions[:, None], mask[:, None, None, :]

    def end_step(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(self.rows)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[rows, :, self._positions] = key[:, :, 0]
        values[rows, :, self._positions] = value[:, :, 0]
        return keys[: self.rows, :, : self._span], values[: self.rows, :, : self._span]


def _send(seq: Sequence, event: int | Finished) -> None:
    if isinstance(event, Finished):
        seq.stages.close(event.reason, completion_tokens=seq.generated)
    try:
        seq.emit(event)
    except Exception:  # noqa: BLE001 - its consumer is gone (a closed event loop): stop working for it
        seq.cancel.set()


def pick_tokens(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
    """The next token of each row of `logits` [rows, vocab], under each sequence's sampling."""
    greedy = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(sequences):
        if seq.generator is None:
            continue
        # Temperature, then nucleus (top_p) filtering, then a draw from this sequence's own
        # generator: what transformers' sampling does, one row at a time.
        scores = logits[i].float() / seq.sampling.temperature
        if seq.sampling.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= 1 - seq.sampling.top_p
            drop[-1] = False  # keep at least the most likely token
            scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        probs = scores.softmax(dim=-1)
        greedy[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return greedy


@dataclass
class BatchScheduler:
    """Runs `model` for every submitted sequence; up to `capacity` decode together, the
    rest wait their turn in arrival order."""

    model: torch.nn.Module
    eos_ids: frozenset[int]
    capacity: int = 16
    prefill_chunk: int = 256  # prompt tokens per prefill forward pass
    tokens_generated: int = 0  # over the scheduler's life: proof that work stops on cancel
    _waiting: deque[Sequence] = field(default_factory=deque)
    _prefilling: list[Sequence] = field(default_factory=list)
    _running: list[Sequence] = field(default_factory=list)
    _wake: threading.Condition = field(default_factory=threading.Condition)
    _stopping: bool = False
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        config = self.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = SlotCache(config.num_hidden_layers, config.num_key_value_heads, head_dim,
                               self.model.dtype)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="text-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, seq: Sequence) -> None:
        with self._wake:
            if self._stopping:
                raise NotReady("the text engine has stopped")
            self._waiting.append(seq)
            self._wake.notify()

    @property
    def active(self) -> int:
        """Sequences holding a slot (prefilling or decoding)."""
        return len(self._prefilling) + len(self._running)

    def _loop(self) -> None:
        try:
            self._steps()
        except Exception:  # every caller is answered below: none waits forever
            log.exception("the text scheduler failed")
        with self._wake:
            self._stopping = True
        for seq in [*self._waiting, *self._prefilling, *self._running]:
            _send(seq, Finished("error", NotReady("the text engine has stopped")))

    def _steps(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._stopping or self._waiting or self._prefilling or self._running):
                        self._wake.wait()
                    if self._stopping:
                        break
                    while self._waiting and self.active < self.capacity:
                        self._prefilling.append(self._waiting.popleft())
                    waiting = list(self._waiting)
                for seq in waiting:
                    if seq.cancel.is_set():
                        with self._wake:
                            self._waiting.remove(seq)
                        _send(seq, Finished("cancelled"))
                self._guarded(self._prefilling, self._prefill_some)
                self._guarded(self._running, self._decode_step)

    def _guarded(self, sequences: list[Sequence], work: Callable[[], None]) -> None:
        """Runs `work`; if it fails, the sequences it was working on end with the error
        and leave, and the scheduler carries on with the others."""
        if not sequences:
            return
        try:
            work()
        except Exception as exc:
            log.exception("text generation step failed")
            for seq in list(sequences):
                self._leave(seq, Finished("error", exc))

    def _leave(self, seq: Sequence, finished: Finished) -> None:
        if seq in self._running:
            index = self._running.index(seq)
            self.cache.remove(index)
            # The cache moved its last row into the freed one: keep the same order here.
            last = self._running.pop()
            if last is not seq:
                self._running[index] = last
        elif seq in self._prefilling:
            self._prefilling.remove(seq)
            seq.prefill_cache = None
        _send(seq, finished)

    def _prefill_some(self) -> None:
        """Feeds prompt chunks, at least one, up to `prefill_chunk` tokens in all while others
        are decoding (so a long prompt stalls them for one chunk at a time); all of them when
        nothing is decoding yet."""
        budget = self.prefill_chunk
        for seq in list(self._prefilling):
            if seq.cancel.is_set():
                self._leave(seq, Finished("cancelled"))
                continue
            while seq.prefilled < len(seq.prompt) and (budget > 0 or not self._running):
                size = min(self.prefill_chunk, len(seq.prompt) - seq.prefilled)
                if seq.prefill_cache is None:
                    seq.prefill_cache = DynamicCache(config=self.model.config)
                    seq.stages.enter("text.prefill", prompt_tokens=len(seq.prompt))
                chunk = torch.tensor([seq.prompt[seq.prefilled: seq.prefilled + size]])
                logits = self.model(input_ids=chunk, cache=seq.prefill_cache, use_cache=True,
                                    logits_to_keep=1).logits[:, -1]
                seq.prefilled += size
                budget -= size
            if seq.prefilled < len(seq.prompt):
                return  # budget spent: the rest of this prompt goes after the next decode step
            self.cache.add(seq.prefill_cache, len(seq.prompt))
            self._prefilling.remove(seq)
            self._running.append(seq)
            seq.prefill_cache = None
            seq.stages.enter("text.decode")
            self._advance(seq, pick_tokens(logits, [seq])[0])

    def _decode_step(self) -> None:
        for seq in [s for s in self._running if s.cancel.is_set()]:
            self._leave(seq, Finished("cancelled"))
        if not self._running:
            return
        batch = list(self._running)
        positions, mask = self.cache.begin_step()
        ids = torch.tensor([[seq.next_token] for seq in batch])
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        self.cache.end_step()
        for seq, token in zip(batch, pick_tokens(logits, batch)):
            self._advance(seq, token)

    def _advance(self, seq: Sequence, token: int) -> None:
        """A sequence's new token: hand it out, or end the sequence."""
        seq.generated += 1
        self.tokens_generated += 1
        if token in self.eos_ids:
            self._leave(seq, Finished("stop"))
            return
        _send(seq, token)
        if seq.generated >= seq.max_new_tokens:
            self._leave(seq, Finished("length"))
        else:
            seq.next_token = token
