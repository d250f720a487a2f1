"""Stable Diffusion pipelines: the real one from disk (offline), or small random-weight ones.

- ``--model tiny``: a tiny random-weight SD pipeline built in code (same weights every time,
  no download) for tests and the smoke run. It makes noise-like images, fast, on a CPU.
- ``--model sd14-random``: random weights with SD v1.4's exact shapes (``data/sd_v1_4_shapes.json``):
  the real compute cost, for benchmarks on machines without the weights.
- ``--model PATH``: a diffusers Stable Diffusion 1.x/2.x folder (with ``model_index.json``).
- ``--model ORG/NAME``: a Hugging Face id, read from the local cache only (never downloaded
  at run time: fetch it once with ``huggingface-cli download ORG/NAME``).

`resolve_model` checks a name in the launcher (cheaply, before any process starts);
`load_pipeline` builds the pipeline inside a generator process.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import torch

from streamgen.errors import UsageError

TINY = "tiny"
SD14_RANDOM = "sd14-random"
BUILTIN_MODELS = (TINY, SD14_RANDOM)
# diffusers pipelines whose components (text encoder, UNet, scheduler, VAE) we drive.
TEXT_TO_IMAGE_CLASSES = {"StableDiffusionPipeline"}
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _hf_cache_dir() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return HF_HUB_CACHE


def resolve_model(model: str) -> str:
    """Return the local folder (or builtin name) for ``--model``, or raise a one-line error."""
    if model in BUILTIN_MODELS:
        return model
    path = Path(model).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
    elif "/" in model and not model.startswith((".", "/", "~")) and model.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "model_index.json")
        if not isinstance(cached, str):
            raise UsageError(
                f"model {model!r} not found: not a folder, and not in the Hugging Face cache "
                f"{_hf_cache_dir()} (streamgen never downloads; run `huggingface-cli download {model}` "
                "where there is internet, or pass --model /path/to/folder)"
            )
        index = Path(cached)
    else:
        raise UsageError(
            f"model {model!r} not found: give a diffusers folder, a cached Hugging Face id "
            f"(ORG/NAME), or one of {', '.join(BUILTIN_MODELS)}"
        )
    check_text_to_image_folder(index)
    return str(index.parent)


def check_text_to_image_folder(index: Path) -> None:
    """A model folder must hold a Stable Diffusion 1.x/2.x text-to-image pipeline."""
    try:
        config = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        raise UsageError(f"{index.parent} is not a diffusers pipeline folder (no readable model_index.json)") from None
    name = config.get("_class_name")
    missing = [c for c in REQUIRED_COMPONENTS if c not in config]
    if name not in TEXT_TO_IMAGE_CLASSES or missing:
        raise UsageError(
            f"{index.parent} holds a {name or 'unknown'} pipeline; streamgen needs a Stable Diffusion "
            f"1.x/2.x text-to-image pipeline ({', '.join(sorted(TEXT_TO_IMAGE_CLASSES))})"
        )


def _char_tokenizer():
    """A character-level CLIP tokenizer: every byte is a token, no BPE merges."""
    from transformers import CLIPTokenizer

    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode  # transformers >= 5
    except ImportError:
        from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        Path(vocab).write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        Path(merges).write_text("#version: 0.2\n")
        # model_max_length: without it the pipeline's tokenizer call overflows.
        return CLIPTokenizer(vocab, merges, model_max_length=77)


def _pipeline_from_configs(unet: dict, vae: dict, text: dict, scheduler: dict, tokenizer, seed: int = 0):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same random weights on every call
        pipe = StableDiffusionPipeline(
            unet=UNet2DConditionModel.from_config(unet),
            vae=AutoencoderKL.from_config(vae),
            text_encoder=CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text.items() if k[0] != "_"})),
            tokenizer=tokenizer,
            scheduler=PNDMScheduler.from_config(scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return pipe


def sd14_shapes() -> dict:
    return json.loads(resources.files("streamgen.data").joinpath("sd_v1_4_shapes.json").read_text())


def tiny_configs() -> tuple[dict, dict, dict, dict, object]:
    """The tiny model's (unet, vae, text encoder, scheduler) configs and its tokenizer."""
    shapes = sd14_shapes()
    unet = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    # Four VAE levels: the latent is 1/8 of the image side, as in the real model.
    vae = dict(
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
    )
    tokenizer = _char_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return unet, vae, text, shapes["scheduler"], tokenizer


def sd14_random_configs() -> tuple[dict, dict, dict, dict, object]:
    """SD v1.4's (unet, vae, text encoder, scheduler) configs and a character tokenizer."""
    shapes = sd14_shapes()
    tokenizer = _char_tokenizer()
    text = dict(shapes["text_encoder"], vocab_size=max(shapes["text_encoder"]["vocab_size"], len(tokenizer)))
    return shapes["unet"], shapes["vae"], text, shapes["scheduler"], tokenizer


def component_configs(model: str) -> dict[str, dict]:
    """The ``unet``, ``vae`` and ``text_encoder`` configs of ``model`` (builtin or a resolved folder), no weights."""
    if model in BUILTIN_MODELS:
        unet, vae, text, _, _ = tiny_configs() if model == TINY else sd14_random_configs()
        return {"unet": dict(unet), "vae": dict(vae), "text_encoder": dict(text)}
    root = Path(model)
    return {name: json.loads((root / name / "config.json").read_text()) for name in ("unet", "vae", "text_encoder")}


def build_tiny_pipeline():
    """A tiny random-weight SD pipeline (about 2 images/s at 64 px on a 2-core CPU)."""
    return _pipeline_from_configs(*tiny_configs())


def build_sd14_random_pipeline():
    """SD v1.4's exact architecture with random weights: the real cost, not the real images."""
    return _pipeline_from_configs(*sd14_random_configs())


def _cast(pipe, dtype: torch.dtype):
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # random weights have no modules to keep in float32
    try:
        return pipe.to(dtype)
    finally:
        logging.set_verbosity(level)


def load_pipeline(model: str, dtype: torch.dtype, safety_checker: bool = False):
    """Build or load the pipeline named by ``resolve_model(model)``; nothing is downloaded."""
    if model in BUILTIN_MODELS:
        pipe = build_tiny_pipeline() if model == TINY else build_sd14_random_pipeline()
        return pipe if dtype == torch.float32 else _cast(pipe, dtype)
    from diffusers import StableDiffusionPipeline

    extra = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)  # diffusers >= 0.36
        return StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True, **extra)
