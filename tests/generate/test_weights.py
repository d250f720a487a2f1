"""--generator.lora (loaded, weighted, fused) and --generator.unet, against plain diffusers."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_lora

from streamgen.config import GeneratorConfig
from streamgen.errors import UsageError
from streamgen.generate.diffusion import DiffusionGenerator, check_generator
from streamgen.generate.pipeline import build_tiny_pipeline, tiny_configs
from streamgen.generate.weights import check_weights, parse_lora

pytest.importorskip("peft", reason="peft (the [lora] extra) is not installed: LoRAs cannot load")

PROMPTS = ["papillon", "pirate, pirate ship, ship"]
SEEDS = [11, 22]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    return make_lora(tmp_path_factory.mktemp("lora"))


def make(**kw) -> DiffusionGenerator:
    settings = dict(resolution=32, steps=3, guidance=7.5, batch_size=2, compile="off")
    settings.update(kw)
    return DiffusionGenerator(GeneratorConfig(**settings), "tiny", 32, CPU)


def reference(pipe, **kw) -> torch.Tensor:
    images = []
    for prompt, seed in zip(PROMPTS, SEEDS):
        out = pipe(
            prompt,
            generator=torch.Generator().manual_seed(seed),
            num_inference_steps=3,
            guidance_scale=7.5,
            height=32,
            width=32,
            output_type="np",
            **kw,
        ).images[0]
        images.append(torch.from_numpy((out * 255).round().astype(np.uint8)).permute(2, 0, 1))
    return torch.stack(images)


def test_parse_lora_scale():
    assert parse_lora("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora("latent-consistency/lcm-lora-sdv1-5:0.8") == ("latent-consistency/lcm-lora-sdv1-5", 0.8)


def test_a_lora_is_fused_changes_the_images_and_equals_diffusers_unfused_lora(lora):
    """The oracle: diffusers' pipeline with the same LoRA loaded (peft layers, not fused) at scale 0.5."""
    plain = make().generate(PROMPTS, SEEDS)
    gen = make(lora=[f"{lora}:0.5"])
    ours = gen.generate(PROMPTS, SEEDS)
    assert (ours.int() - plain.int()).abs().max() > 8  # the LoRA changes the images
    assert not any("lora" in name for name, _ in gen.pipe.unet.named_modules())  # fused, layers unloaded
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.5])
    assert (ours.int() - reference(pipe).int()).abs().max() <= 1


def test_the_same_file_twice_gives_the_same_images_and_adds_up(lora):
    once = make(lora=[str(lora)]).generate(PROMPTS, SEEDS)
    assert torch.equal(make(lora=[str(lora)]).generate(PROMPTS, SEEDS), once)  # the same file: the same images
    twice = make(lora=[f"{lora}:0.5", f"{lora.parent}:0.5"]).generate(PROMPTS, SEEDS)  # a file and its folder
    assert (twice.int() - once.int()).abs().max() <= 1  # two fused halves = one whole (LoRAs add linearly)


def test_a_lora_for_other_shapes_is_refused_before_start(tmp_path, lora):
    check_weights(GeneratorConfig(lora=[str(lora)]), "tiny")
    other = make_lora(tmp_path / "sd2", cross_attention_dim=48)  # as an SD 2.x LoRA (1024) on SD 1.x (768)
    with pytest.raises(
        UsageError, match=r"--generator.lora .* is for another model: unet\..*attn2\.to_k has 48 inputs"
    ):
        check_weights(GeneratorConfig(lora=[str(other)]), "tiny")
    deeper = make_lora(
        tmp_path / "deeper",
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    with pytest.raises(UsageError, match=r"targets unet\..*which this model does not have"):
        check_weights(GeneratorConfig(lora=[str(deeper)]), "tiny")
    with pytest.raises(UsageError, match=r"--generator.lora 'nowhere/x' not found"):
        check_weights(GeneratorConfig(lora=["nowhere/x"]), "tiny")


def test_missing_peft_is_one_line(monkeypatch, lora):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(UsageError, match=r"--generator.lora needs the peft package.*streamgen\[lora\]"):
        check_generator(GeneratorConfig(lora=[str(lora)]), "cpu", "tiny")


def test_a_unet_folder_replaces_the_models_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)  # other weights than the tiny model's
        unet = UNet2DConditionModel.from_config(tiny_configs()[0])
    unet.save_pretrained(tmp_path / "distilled")
    gen = make(unet=str(tmp_path / "distilled"))
    mine, theirs = gen.pipe.unet.state_dict(), unet.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ours = gen.generate(PROMPTS, SEEDS)
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.unet = UNet2DConditionModel.from_pretrained(tmp_path / "distilled")
    assert (ours.int() - reference(pipe).int()).abs().max() <= 1
    assert (ours.int() - make().generate(PROMPTS, SEEDS).int()).abs().max() > 8


def test_a_unet_for_another_model_is_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_config(dict(tiny_configs()[0], cross_attention_dim=48)).save_pretrained(tmp_path / "u")
    with pytest.raises(UsageError, match=r"--generator.unet .* is for another model: its cross_attention_dim is 48"):
        check_weights(GeneratorConfig(unet=str(tmp_path / "u")), "tiny")
    with pytest.raises(UsageError, match=r"--generator.unet .*: no config.json"):
        check_weights(GeneratorConfig(unet=str(tmp_path)), "tiny")
