"""Weights on top of the model: ``--generator.lora PATH[:SCALE]`` (fused) and ``--generator.unet PATH``.

- LoRAs (LCM-LoRA, TCD / Hyper-SD LoRAs, ...) are loaded with diffusers' ``load_lora_weights``
  (peft backend), weighted with ``set_adapters`` and fused into the base weights with
  ``fuse_lora``; the LoRA layers are then unloaded (``unload_lora_weights`` keeps what was
  fused), so the UNet the generator runs, and compiles, is a plain one at full speed.
- ``--generator.unet``: a diffusers UNet folder (``config.json`` + weights; a pipeline folder's
  ``unet/`` is found too) or a cached Hugging Face id, loaded in place of the model's UNet
  (e.g. a distilled one-step UNet).

Both come from a local path or the offline Hugging Face cache (never downloaded), like
``--model``. `check_weights` reads their shapes in the launcher and refuses, in one line, a LoRA
or UNet made for another model (an SD 2.x LoRA on SD 1.x) before any process starts.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from streamgen.errors import UsageError

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights name
# suffix of a LoRA tensor's key -> which factor it is (diffusers/peft and the older diffusers format)
_FACTORS = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
}


@dataclass(frozen=True)
class LoraSpec:
    source: str  # as given
    file: str  # the resolved local weights file
    scale: float


def parse_lora(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (PATH, SCALE); a trailing ``:number`` is the scale (default 1)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _hub_snapshot(name: str, flag: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: not in the cache
        raise UsageError(
            f"{flag} {name!r} not found: not a file or folder, and not in the Hugging Face cache {HF_HUB_CACHE} "
            f"(streamgen never downloads; run `huggingface-cli download {name}` where there is internet)"
        ) from None


def _local(name: str, flag: str) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _hub_snapshot(name, flag)
    raise UsageError(f"{flag} {name!r} not found: give a local file or folder, or a cached Hugging Face id ORG/NAME")


def resolve_lora(text: str) -> LoraSpec:
    """The local weights file of one ``--generator.lora`` value, or a one-line error."""
    name, scale = parse_lora(text)
    path = _local(name, "--generator.lora")
    if path.is_dir():
        files = [path / LORA_FILE] if (path / LORA_FILE).is_file() else sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise UsageError(
                f"--generator.lora {name}: the folder holds {len(files)} .safetensors files; name the file itself"
            )
        path = files[0]
    return LoraSpec(text, str(path), scale)


def resolve_unet(name: str) -> str:
    """The local UNet folder of ``--generator.unet`` (its ``config.json`` beside the weights)."""
    path = _local(name, "--generator.unet")
    for folder in (path, path / "unet"):
        if (folder / "config.json").is_file():
            return str(folder)
    raise UsageError(f"--generator.unet {name}: no config.json there (nor in unet/): give a diffusers UNet folder")


def check_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise UsageError(
            "--generator.lora needs the peft package (diffusers' LoRA backend): pip install 'streamgen[lora]'"
        )


def _meta_modules(configs: dict[str, dict]) -> dict[str, torch.nn.Module]:
    """``unet.X`` / ``text_encoder.X`` -> module, built on the meta device (shapes only, no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items() if k[0] != "_"}))
    modules = {f"unet.{n}": m for n, m in unet.named_modules()}
    modules.update({f"text_encoder.{n}": m for n, m in text.named_modules()})
    return modules


def _in_out(module: torch.nn.Module) -> tuple[int, int] | None:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def check_lora_fits(spec: LoraSpec, configs: dict[str, dict]) -> None:
    """Every LoRA factor targets a layer of the model with its input and output sizes."""
    from diffusers import StableDiffusionPipeline

    try:
        state, _ = StableDiffusionPipeline.lora_state_dict(spec.file)
    except Exception as e:
        raise UsageError(
            f"--generator.lora {spec.source}: not a LoRA diffusers can read ({type(e).__name__})"
        ) from None
    modules = _meta_modules(configs)
    for key, tensor in state.items():
        factor = next((f for suffix, f in _FACTORS.items() if key.endswith(suffix)), None)
        if factor is None:
            continue  # alphas, biases (diffusers checks those itself)
        target = key[: -len(next(s for s in _FACTORS if key.endswith(s)))]
        layer = _in_out(modules[target]) if target in modules else None
        if layer is None:
            raise UsageError(
                f"--generator.lora {spec.source} targets {target}, which this model does not have: a LoRA for "
                "another architecture (SDXL? a different UNet?); use one made for this model"
            )
        size = tensor.shape[1] if factor == "down" else tensor.shape[0]
        wanted = layer[0] if factor == "down" else layer[1]
        if size != wanted:
            side = "inputs" if factor == "down" else "outputs"
            raise UsageError(
                f"--generator.lora {spec.source} is for another model: {target} has {size} {side} in the LoRA but "
                f"{wanted} in this one (an SD 2.x LoRA on SD 1.x, or the reverse?); use a LoRA for this model"
            )


def check_unet_fits(folder: str, configs: dict[str, dict]) -> None:
    """A replacement UNet must read the model's latents and text embeddings."""
    unet = json.loads((Path(folder) / "config.json").read_text())
    text_width = configs["text_encoder"].get("hidden_size")
    latents = configs["vae"].get("latent_channels", 4)
    for key, theirs, ours in (
        ("cross_attention_dim", unet.get("cross_attention_dim"), text_width),
        ("in_channels", unet.get("in_channels"), latents),
        ("out_channels", unet.get("out_channels"), latents),
    ):
        if theirs != ours:
            raise UsageError(
                f"--generator.unet {folder} is for another model: its {key} is {theirs}, this model's {ours} "
                "(an SD 2.x UNet on SD 1.x, or an SDXL one?); use a UNet distilled from this model"
            )


def check_weights(cfg, model: str) -> None:
    """``--generator.unet`` and every ``--generator.lora`` fit ``model``; one line otherwise."""
    from streamgen.generate.pipeline import component_configs

    configs = component_configs(model)
    if cfg.unet:
        folder = resolve_unet(cfg.unet)
        check_unet_fits(folder, configs)
        configs["unet"] = json.loads((Path(folder) / "config.json").read_text())
    if cfg.lora:
        check_peft()
    for text in cfg.lora:
        check_lora_fits(resolve_lora(text), configs)


def load_unet(name: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(resolve_unet(name), torch_dtype=dtype, local_files_only=True)


def fuse_loras(pipe, loras: list[str]) -> None:
    """Load every LoRA, weight it by its scale, fuse them all into the base weights, drop the LoRA layers."""
    if not loras:
        return
    specs = [resolve_lora(text) for text in loras]
    names = [f"lora{i}" for i in range(len(specs))]
    for spec, name in zip(specs, names):
        pipe.load_lora_weights(spec.file, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[s.scale for s in specs])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()  # keeps the fused weights: a plain UNet (compiles, no peft overhead)
