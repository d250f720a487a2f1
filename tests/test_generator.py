from unittest import mock

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor

from streamgen.config import GeneratorConfig
from streamgen.errors import UsageError
from streamgen.generator import DiffusionGenerator, FakeGenerator, FaultInjection, check_attention

PROMPTS = ["papillon", "pirate, pirate ship, ship", "tabby, tabby cat inside hockey arena"]
SEEDS = [11, 22, 33]
CPU = torch.device("cpu")


def make(**kw) -> DiffusionGenerator:
    settings = dict(resolution=64, steps=4, guidance=7.5, batch_size=3, compile="off")
    settings.update(kw)
    out = settings.pop("out", 64)
    return DiffusionGenerator(GeneratorConfig(**settings), "tiny", out, CPU)


def test_images_have_the_asked_size_and_dtype_and_repeat_per_seed():
    gen = make(out=32)
    a = gen.generate(PROMPTS, SEEDS)
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, gen.generate(PROMPTS, SEEDS))
    assert not torch.equal(a[0], gen.generate(PROMPTS[:1], [12])[0])


def test_a_sample_does_not_depend_on_its_batch():
    gen = make()
    batch = gen.generate(PROMPTS, SEEDS)
    alone = gen.generate(PROMPTS[1:2], SEEDS[1:2])  # padded to the batch shape internally
    other = gen.generate([PROMPTS[0], PROMPTS[1], PROMPTS[0]], [5, SEEDS[1], 6])
    assert (alone[0].int() - batch[1].int()).abs().max() <= 1
    assert (other[1].int() - batch[1].int()).abs().max() <= 1


@pytest.mark.parametrize("scheduler, guidance", [("default", 7.5), ("default", 2.0), ("ddim", 7.5), ("dpm++", 2.0)])
def test_equals_the_diffusers_pipeline_within_one_level(tiny_pipe, scheduler, guidance):
    gen = make(scheduler=scheduler, guidance=guidance)
    ours = gen.generate(PROMPTS, SEEDS)
    tiny_pipe.scheduler = type(gen.pipe.scheduler).from_config(gen.pipe.scheduler.config)
    for i, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS)):
        ref = tiny_pipe(
            prompt,
            generator=torch.Generator().manual_seed(seed),
            num_inference_steps=4,
            guidance_scale=guidance,
            height=64,
            width=64,
            output_type="np",
        ).images[0]
        ref = torch.from_numpy((ref * 255).round().astype(np.uint8)).permute(2, 0, 1)
        assert (ours[i].int() - ref.int()).abs().max() <= 1, f"sample {i}"


def test_text_embeddings_are_cached_per_prompt():
    from diffusers import StableDiffusionPipeline

    gen = make()
    original = StableDiffusionPipeline.encode_prompt
    with mock.patch.object(StableDiffusionPipeline, "encode_prompt", autospec=True, side_effect=original) as spy:
        gen.generate(PROMPTS, SEEDS)
        gen.generate(PROMPTS[::-1], SEEDS)
    # (the pipeline itself calls encode_prompt(None, prompt_embeds=...): nothing to encode)
    encoded = [p for call in spy.call_args_list for p in (call.args[1] or [])]
    assert sorted(encoded) == sorted(PROMPTS + [""])  # each prompt once; "" (unconditional) once


class BlackOutFirstCall(torch.nn.Module):
    """A stand-in safety checker: flags every image of its first call (as NSFW: blacked out)."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.register_buffer("anchor", torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, images, clip_input):
        self.calls += 1
        flagged = [self.calls == 1] * len(images)
        images = images.clone()
        for i, f in enumerate(flagged):
            if f:
                images[i] = 0
        return images, flagged


def test_black_images_are_redrawn_and_counted():
    gen = make()
    gen.pipe.safety_checker = BlackOutFirstCall()
    gen.pipe.feature_extractor = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    images = gen.generate(PROMPTS, SEEDS)
    assert gen.redraws == 3
    assert (images.flatten(1).amax(1) > 0).all()
    clean = make().generate(PROMPTS, SEEDS)
    assert not torch.equal(images, clean)  # redrawn with a derived seed, not the same image


@pytest.mark.slow
def test_compiled_unet_gives_the_same_images():
    compiled = make(compile="on", batch_size=2)
    compiled.warmup()
    plain = make(batch_size=2)
    a = compiled.generate(PROMPTS[:2], SEEDS[:2])
    b = plain.generate(PROMPTS[:2], SEEDS[:2])
    assert (a.int() - b.int()).abs().max() <= 1


def test_fake_generator_is_deterministic_per_seed():
    gen = FakeGenerator(GeneratorConfig(batch_size=2), 16, CPU)
    a = gen.generate(["x", "y"], [1, 2])
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a[1], gen.generate(["z"], [2])[0])


def test_xformers_missing_is_a_usage_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_xformers(name, *args, **kw):
        if name == "xformers":
            raise ImportError("no xformers")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_xformers)
    with pytest.raises(UsageError, match="xformers is not installed"):
        check_attention("xformers")
    check_attention("sdpa")


def test_fault_injection_spec(monkeypatch):
    monkeypatch.setenv("STREAMGEN_INJECT_FAULT", "raise:1:2:3")
    fault = FaultInjection.from_env()
    assert fault == FaultInjection("raise", 1, 2, 3)
    fault.maybe_fail(0, 0, 2)  # another generator: nothing
    fault.maybe_fail(1, 3, 2)  # a later life: nothing
    with pytest.raises(RuntimeError, match="injected fault"):
        fault.maybe_fail(1, 2, 2)


@pytest.mark.gpu
def test_gpu_generator_fp16_compiled_matches_eager():
    cuda = torch.device("cuda")
    cfg = dict(resolution=64, steps=4, guidance=7.5, batch_size=4)
    graphs = DiffusionGenerator(GeneratorConfig(**cfg, compile="on"), "tiny", 32, cuda)
    graphs.warmup()
    eager = DiffusionGenerator(GeneratorConfig(**cfg, compile="off"), "tiny", 32, cuda)
    prompts, seeds = PROMPTS + PROMPTS[:1], SEEDS + [44]
    a, b = graphs.generate(prompts, seeds), eager.generate(prompts, seeds)
    assert a.device.type == "cuda" and a.dtype == torch.uint8
    assert (a.int() - b.int()).abs().float().mean() < 2
