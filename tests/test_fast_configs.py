"""configs/fast/: each few-step or cached generator preset, its stream and cache arm at one budget."""

from pathlib import Path

import pytest

from streamgen.config import parse_config
from streamgen.generate.diffusion import check_generator
from streamgen.generate.sampling import check_sampling

ROOT = Path(__file__).resolve().parents[1]
FAST = ROOT / "configs" / "fast"
# preset: (model, scheduler, steps, guidance, lora, deepcache)
PRESETS = {
    "lcm4_cdc_g2": ("CompVis/stable-diffusion-v1-4", "lcm", 4, 2.0, ["latent-consistency/lcm-lora-sdv1-5"], 0),
    "turbo1_cdc": ("stabilityai/sd-turbo", "default", 1, 0.0, [], 0),
    "turbo4_cdc": ("stabilityai/sd-turbo", "default", 4, 0.0, [], 0),
    "deepcache3_cdc_g2": ("CompVis/stable-diffusion-v1-4", "default", 50, 2.0, [], 3),
}


def test_every_preset_has_both_arms_and_nothing_else():
    assert sorted(p.name for p in FAST.glob("*.yaml")) == sorted(
        f"in100_{k}_{arm}.yaml" for k in PRESETS for arm in ("stream", "cache")
    )


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_arms_differ_only_in_reuse_at_one_budget(preset):
    stream = parse_config(["--config", str(FAST / f"in100_{preset}_stream.yaml")])
    cache = parse_config(["--config", str(FAST / f"in100_{preset}_cache.yaml")])
    model, scheduler, steps, guidance, lora, deepcache = PRESETS[preset]
    g = stream.generator
    assert (stream.model, g.scheduler, g.steps, g.guidance, g.lora, g.deepcache) == (
        model,
        scheduler,
        steps,
        guidance,
        lora,
        deepcache,
    )
    assert (stream.classes, stream.prompt, g.resolution, stream.stream.resolution) == ("imagenet100", "c_dc", 512, 256)
    assert (stream.source, cache.source, cache.cache.scale) == ("stream", "cache", 1)
    assert stream.generator == cache.generator and stream.stream == cache.stream
    assert stream.train.budget_gpu_hours == cache.train.budget_gpu_hours == 9
    for key in ("arch", "augment", "head", "label_smoothing", "crop", "lr"):
        assert getattr(stream.train, key) == getattr(cache.train, key), key
    check_generator(g, "cuda")  # compile auto on a GPU: DeepCache leaves the UNet eager, not refused
    if model.startswith("CompVis"):  # SD v1.4's scheduler config, as its folder holds it
        check_sampling(g, "sd14-random")
