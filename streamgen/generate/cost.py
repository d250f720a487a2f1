"""FLOPs per image of a generator setting, counted from the model's config before any run.

    TFLOP/image = sum over the UNet calls of (rows x one row's UNet FLOPs) + VAE decode + text encoder

- UNet calls: the scheduler's timesteps for ``steps`` (PNDM: steps + 1), built from the model's
  scheduler config exactly as the generator builds it (`streamgen.generate.sampling`);
- rows: 2 with classifier-free guidance (guidance > 1 on a UNet without a guidance embedding:
  the pipeline's own rule), else 1;
- one row's FLOPs: counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward of the
  UNet (the model's, ``--generator.unet``'s; fused LoRAs change no shape) built on the meta
  device at the generation size: no weights, no memory, a few seconds for SD v1.4. With ToMe
  the counted forward is the patched one; with DeepCache the calls that reuse the deep
  features are counted apart (a forward through the shallow branch only) and DeepCache's own
  rule says which calls those are;
- VAE decode and text encoder: one forward each, counted the same way (the text encoder once
  per image, although the generators cache embeddings per prompt: an upper bound).

Counted for SD v1.4 at 512 px: 0.80 TFLOP per UNet row, 2.51 per decode, 0.013 per prompt
(published: 0.84, 2.54, 0.014, ``data/sd_v1_4_shapes.json``). `image_cost` goes into the
resolved config's ``cost`` section and into ``bench/generate.py``'s table.
"""

from __future__ import annotations

import functools
import json
import types

import torch

from streamgen.config import GeneratorConfig

# The paper's setting (Sariyildiz et al.): SD v1.4, 50 PNDM steps, guidance 7.5 (CFG), 512 px.
PAPER = GeneratorConfig()


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _text(config: dict):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**{k: v for k, v in config.items() if k[0] != "_"}))


@functools.lru_cache(maxsize=32)
def _component_flops(configs_json: str, resolution: int, tome: float, deepcache: bool) -> dict[str, float]:
    """FLOPs of one UNet row (full, and DeepCache's cached call), one decode, one prompt, on meta."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    configs = json.loads(configs_json)
    with torch.device("meta"), torch.inference_mode():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text = _text(configs["text_encoder"])
        side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        latents = torch.zeros(1, unet.config.in_channels, side, side)
        embeds = torch.zeros(1, 77, unet.config.cross_attention_dim)
        pipe = types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(timesteps=[1, 0]))
        if tome > 0:
            import tomesd

            tomesd.apply_patch(unet, ratio=tome, use_rand=False)
        out = {"vae_decode": _flops(lambda: vae.decode(torch.zeros(1, vae.config.latent_channels, side, side)))}
        out["text_encoder"] = _flops(lambda: text(torch.zeros(1, 77, dtype=torch.long)))
        helper = None
        if deepcache:  # interval 2 over timesteps [1, 0]: call 0 full, call 1 cached
            from DeepCache import DeepCacheSDHelper

            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=2, cache_branch_id=0)
            helper.enable()
        # DeepCache looks the timestep up with .item(): a CPU scalar (the UNet moves it to the latents' device)
        out["unet_row"] = _flops(
            lambda: pipe.unet(latents, torch.tensor(1, device="cpu"), encoder_hidden_states=embeds)
        )
        out["unet_row_cached"] = out["unet_row"]
        if helper is not None:
            out["unet_row_cached"] = _flops(
                lambda: pipe.unet(latents, torch.tensor(0, device="cpu"), encoder_hidden_states=embeds)
            )
            helper.disable()
    return out


def deepcache_full_calls(timesteps: list[int], interval: int) -> list[bool]:
    """Which UNet calls DeepCache runs in full: its rule (``DeepCacheSDHelper.is_skip_step``, uniform
    mode): call at timestep index i is full iff (i - first index) % interval == 0, where the index is
    the timestep's first position in the schedule (PNDM's repeated timestep shares its index)."""
    if interval <= 1:
        return [True] * len(timesteps)
    index = [timesteps.index(t) for t in timesteps]
    return [(i - index[0]) % interval == 0 for i in index]


def guided(cfg: GeneratorConfig, unet_config: dict) -> bool:
    """Classifier-free guidance (2 UNet rows per call), by the pipeline's own rule: guidance > 1 and no
    guidance embedding in the UNet (an LCM-distilled UNet takes the scale as an input instead)."""
    return cfg.guidance > 1 and unet_config.get("time_cond_proj_dim") is None


def _tflop(flops: float) -> float:
    return float(f"{flops / 1e12:.6g}")


def image_cost(cfg: GeneratorConfig, model: str) -> dict:
    """TFLOP per image of ``cfg`` on ``model`` (a builtin name or a resolved folder), and its parts."""
    from streamgen.generate.pipeline import component_configs
    from streamgen.generate.sampling import scheduler_for
    from streamgen.generate.weights import resolve_unet

    configs = component_configs(model)
    if cfg.unet:
        with open(f"{resolve_unet(cfg.unet)}/config.json") as f:
            configs["unet"] = json.load(f)
    scheduler = scheduler_for(cfg, model)
    scheduler.set_timesteps(cfg.steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    full = deepcache_full_calls(timesteps, cfg.deepcache)
    parts = _component_flops(json.dumps(configs, sort_keys=True), cfg.resolution, cfg.tome, cfg.deepcache > 1)
    rows = 2 if guided(cfg, configs["unet"]) else 1
    unet = rows * sum(parts["unet_row"] if f else parts["unet_row_cached"] for f in full)
    total = unet + parts["vae_decode"] + parts["text_encoder"]
    return {
        "unet_calls": len(timesteps),
        "unet_calls_full": sum(full),
        "rows_per_call": rows,
        "unet_tflop_per_row": _tflop(parts["unet_row"]),
        "unet_tflop_per_cached_row": _tflop(parts["unet_row_cached"]),
        "vae_decode_tflop": _tflop(parts["vae_decode"]),
        "text_encoder_tflop": _tflop(parts["text_encoder"]),
        "tflop_per_image": _tflop(total),
    }


def paper_cost(model: str) -> dict:
    """`image_cost` of the paper's setting (50 PNDM steps, guidance 7.5, 512 px) on ``model``."""
    return image_cost(PAPER, model)
