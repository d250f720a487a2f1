"""FLOPs per image from the model's config (streamgen.generate.cost)."""

import importlib.util

import pytest
import torch

from streamgen.config import GeneratorConfig
from streamgen.generate.cost import deepcache_full_calls, image_cost, paper_cost
from streamgen.generate.diffusion import DiffusionGenerator
from streamgen.generate.pipeline import sd14_shapes


def test_sd14_counted_from_its_config_matches_the_published_figures():
    """The oracle: the published per-call figures of SD v1.4 (data/sd_v1_4_shapes.json), within 5%."""
    published = sd14_shapes()["flops_per_image_published"]
    paper = paper_cost("sd14-random")
    assert paper["unet_calls"] == 51 and paper["rows_per_call"] == 2  # PNDM: 50 steps + 1, CFG pair
    assert paper["unet_tflop_per_row"] == pytest.approx(published["unet_per_cfg_step_tflop"] / 2, rel=0.05)
    assert paper["vae_decode_tflop"] == pytest.approx(published["vae_decode_512_tflop"], rel=0.05)
    assert paper["text_encoder_tflop"] == pytest.approx(published["text_encoder_tflop"], abs=0.001)  # 2 digits
    assert 80 < paper["tflop_per_image"] < 90  # the issue's ~88 TFLOP per image
    parts = paper["unet_calls"] * 2 * paper["unet_tflop_per_row"] + paper["vae_decode_tflop"]
    assert paper["tflop_per_image"] == pytest.approx(parts + paper["text_encoder_tflop"], rel=1e-4)


def test_few_steps_without_guidance_cost_a_fraction():
    lcm = image_cost(GeneratorConfig(scheduler="lcm", steps=4, guidance=1.0), "sd14-random")
    assert (lcm["unet_calls"], lcm["rows_per_call"]) == (4, 1)
    turbo1 = image_cost(GeneratorConfig(steps=1, guidance=0.0, scheduler="euler-a"), "sd14-random")
    assert turbo1["unet_calls"] == 1
    paper = paper_cost("sd14-random")["tflop_per_image"]
    assert paper / lcm["tflop_per_image"] > 10 and paper / turbo1["tflop_per_image"] > 25
    half = image_cost(GeneratorConfig(resolution=256), "sd14-random")
    assert half["unet_tflop_per_row"] == pytest.approx(paper_cost("sd14-random")["unet_tflop_per_row"] / 4, rel=0.15)


def test_the_counted_unet_calls_are_the_ones_a_generator_makes():
    gen = DiffusionGenerator(
        GeneratorConfig(resolution=64, steps=3, guidance=1.0, scheduler="lcm", batch_size=1, compile="off"),
        "tiny",
        32,
        torch.device("cpu"),
    )
    calls = [0]
    gen.pipe.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    gen.generate(["papillon"], [1])
    assert calls[0] == image_cost(gen.cfg, "tiny")["unet_calls"] == 3


@pytest.mark.skipif(importlib.util.find_spec("DeepCache") is None, reason="DeepCache is not installed")
def test_deepcache_full_calls_are_the_ones_its_helper_runs_in_full():
    """The oracle: DeepCache's own helper on a real pipeline, its full calls counted at the mid block
    (whose layers run only on a full call); PNDM's repeated timestep included."""
    gen = DiffusionGenerator(
        GeneratorConfig(resolution=64, steps=7, guidance=7.5, batch_size=1, compile="off", deepcache=3),
        "tiny",
        32,
        torch.device("cpu"),
    )
    full = [0]
    gen.pipe.unet.mid_block.resnets[0].register_forward_pre_hook(lambda *_: full.__setitem__(0, full[0] + 1))
    gen.generate(["papillon"], [1])
    cost = image_cost(gen.cfg, "tiny")
    timesteps = [int(t) for t in gen.pipe.scheduler.timesteps]
    assert full[0] == cost["unet_calls_full"] == sum(deepcache_full_calls(timesteps, 3))
    assert cost["unet_calls"] == 8 and cost["unet_calls_full"] < cost["unet_calls"]
    assert cost["unet_tflop_per_cached_row"] < cost["unet_tflop_per_row"] / 2
    sd = image_cost(GeneratorConfig(deepcache=3), "sd14-random")
    assert 2.0 < paper_cost("sd14-random")["tflop_per_image"] / sd["tflop_per_image"] < 3.0  # its paper: ~2.3x
