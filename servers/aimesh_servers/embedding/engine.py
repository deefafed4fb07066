"""Text embeddings on transformers, with no gRPC in sight.

Loads any sentence-transformers or plain transformers checkpoint (hub id or folder):
token states from `AutoModel`, pooled the way the checkpoint's sentence-transformers
Pooling module says (mean when it has none), optionally scaled to unit length. Texts
run in micro-batches of similar length, so that short texts pay for little padding.
Concurrent calls share forward passes through a DynamicBatcher (`embed_batched`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import cached_file

from ..models import builtin
from ..runtime.batching import BatchSettings, DynamicBatcher, Work
from ..runtime.errors import InvalidArgument, OutOfRange

# sentence-transformers Pooling config keys -> the pooling we run.
POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class EmbedRequest:
    texts: list[str]
    normalize: bool = False


@dataclass
class EmbedResult:
    vectors: np.ndarray  # (len(texts), dimensions), float32, in the order of the texts
    tokens: int  # tokens read, special tokens included


@dataclass
class EmbeddingLimits:
    max_batch: int = 128
    max_text_chars: int = 32_000  # cheap guard before tokenizing; the token limit is the real one
    max_text_tokens: int | None = None  # None: the checkpoint's own max_seq_length
    micro_batch: int = 32


@dataclass
class EmbeddingEngine:
    source: str
    limits: EmbeddingLimits = field(default_factory=EmbeddingLimits)
    batching: BatchSettings = field(default_factory=BatchSettings)

    @property
    def capacity(self) -> int:
        """Calls that may be admitted at once: enough to fill a batch while another runs."""
        return self.batching.admitted

    def load(self) -> None:
        torch.set_num_threads(self.batching.torch_threads)
        path = builtin.resolve(self.source)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"  # what "lasttoken" pooling expects
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32)
        self.model.eval()
        self.pooling, max_seq_length = _sentence_transformers_config(path)
        self.max_tokens = self.limits.max_text_tokens or _token_limit(
            max_seq_length, self.tokenizer.model_max_length,
            getattr(self.model.config, "max_position_embeddings", None),
        )
        self.dimensions = int(self.model.config.hidden_size)
        # Fast tokenizers keep padding state: concurrent calls may not share one.
        self._tokenizer_lock = threading.Lock()
        self.batcher: DynamicBatcher[EmbedRequest, EmbedResult] = DynamicBatcher(
            self._embed_batch, self.batching, name="embedding-batcher")

    def validate(self, request: EmbedRequest) -> None:
        """Checks that need no tokenizer; `embed` also checks token lengths."""
        if not request.texts:
            raise InvalidArgument("texts must hold at least one text", field="texts")
        if len(request.texts) > self.limits.max_batch:
            raise OutOfRange(
                f"texts holds {len(request.texts)} texts; the limit is {self.limits.max_batch} a call",
                field="texts",
            )
        for i, text in enumerate(request.texts):
            if not text.strip():
                raise InvalidArgument(f"texts[{i}] is empty", field=f"texts[{i}]")
            if len(text) > self.limits.max_text_chars:
                raise OutOfRange(
                    f"texts[{i}] is {len(text)} characters; the limit is {self.limits.max_text_chars}",
                    field=f"texts[{i}]",
                )

    async def embed_batched(self, request: EmbedRequest) -> EmbedResult:
        """`embed`, sharing forward passes with concurrent callers (see runtime.batching)."""
        self.validate(request)
        return await self.batcher.run(request, size=len(request.texts))

    def embed(self, request: EmbedRequest, cancel: threading.Event | None = None) -> EmbedResult:
        """Blocking, this call alone. Stops between micro-batches (CancelledError) once `cancel` is set."""
        self.validate(request)
        ids = self._tokenize(request.texts)
        self._check_lengths(ids)
        vectors = self._encode(ids, cancel)
        return EmbedResult(_normalized(vectors) if request.normalize else vectors, sum(map(len, ids)))

    def _embed_batch(self, batch: Sequence[Work[EmbedRequest, EmbedResult]]) -> list[EmbedResult | Exception]:
        """The texts of every request in one pass; a request with a text too long fails alone."""
        ids = self._tokenize([text for work in batch for text in work.item.texts])
        owned: list[list[list[int]]] = []  # each request's token rows
        for work in batch:
            owned.append(ids[:len(work.item.texts)])
            ids = ids[len(work.item.texts):]
        answers: list[EmbedResult | Exception] = []
        for rows in owned:
            try:
                self._check_lengths(rows)
                answers.append(EmbedResult(np.empty((len(rows), self.dimensions), np.float32), sum(map(len, rows))))
            except OutOfRange as exc:
                answers.append(exc)
        runnable = [k for k, answer in enumerate(answers) if isinstance(answer, EmbedResult)]
        vectors = self._encode([row for k in runnable for row in owned[k]])
        start = 0
        for k in runnable:
            own = vectors[start:start + len(owned[k])]
            start += len(own)
            answers[k].vectors = _normalized(own) if batch[k].item.normalize else own  # type: ignore[union-attr]
        return answers

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        with self._tokenizer_lock:
            return self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]

    def _check_lengths(self, ids: list[list[int]]) -> None:
        for i, row in enumerate(ids):
            if len(row) > self.max_tokens:
                raise OutOfRange(
                    f"texts[{i}] is {len(row)} tokens; the limit is {self.max_tokens}", field=f"texts[{i}]"
                )

    def _encode(self, ids: list[list[int]], cancel: threading.Event | None = None) -> np.ndarray:
        """Pooled vectors of token id rows, in their order. Rows of similar length share a
        micro-batch, so that short texts pay for little padding."""
        vectors = np.empty((len(ids), self.dimensions), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        step = self.limits.micro_batch
        for start in range(0, len(order), step):
            if cancel is not None and cancel.is_set():
                raise CancelledError
            chunk = order[start:start + step]
            with self._tokenizer_lock:
                batch = self.tokenizer.pad(
                    {"input_ids": [ids[i] for i in chunk]}, padding=True, return_tensors="pt"
                )
            with torch.inference_mode():
                states = self.model(**batch).last_hidden_state
                vectors[chunk] = _pool(states, batch["attention_mask"], self.pooling).numpy()
        return vectors


def _normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (as torch.nn.functional.normalize does)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _pool(states: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return states[:, 0]
    if mode == "lasttoken":  # right padding: the last real token of each row
        return states[torch.arange(states.shape[0]), mask.sum(dim=1) - 1]
    weights = mask.unsqueeze(-1).to(states.dtype)
    if mode == "max":
        return states.masked_fill(weights == 0, torch.finfo(states.dtype).min).max(dim=1).values
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _json(path: str, name: str) -> dict | list | None:
    """A json file of a checkpoint folder or hub repo, or None if it has none."""
    found = cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    if found is None:
        return None
    with open(found, encoding="utf-8") as f:
        return json.load(f)


def _sentence_transformers_config(path: str) -> tuple[str, int | None]:
    """(pooling mode, max_seq_length) of a sentence-transformers checkpoint; ("mean", None)
    for a plain transformers one. Modules we cannot run (Dense, ...) fail the load."""
    modules = _json(path, "modules.json") or []
    mode = "mean"
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        if kind == "Pooling":
            config = _json(path, f"{module['path']}/config.json") or {}
            enabled = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
            if len(enabled) != 1 or enabled[0] not in POOLING_KEYS:
                raise ValueError(f"{path}: pooling {enabled} is not one of {', '.join(POOLING_KEYS)}")
            mode = POOLING_KEYS[enabled[0]]
        elif kind not in ("Transformer", "Normalize"):
            raise ValueError(f"{path}: sentence-transformers module {kind} is not supported")
    seq = (_json(path, "sentence_bert_config.json") or {}).get("max_seq_length")
    return mode, seq


def _token_limit(max_seq_length: int | None, tokenizer_max: int, positions: int | None) -> int:
    if max_seq_length:
        return int(max_seq_length)
    # Tokenizers without a limit report a huge sentinel.
    candidates = [n for n in (tokenizer_max, positions) if n and n < 1_000_000]
    return min(candidates, default=512)
