"""Schedulers (--generator.scheduler, timestep_spacing, eta) against plain diffusers, and per-sample noise."""

import numpy as np
import pytest
import torch

from streamgen.config import GeneratorConfig
from streamgen.errors import UsageError
from streamgen.generate.diffusion import DiffusionGenerator, ReplayedOutputs
from streamgen.generate.sampling import check_sampling, resolved_eta

PROMPTS = ["papillon", "pirate, pirate ship, ship", "tabby, tabby cat inside hockey arena"]
SEEDS = [11, 22, 33]
CPU = torch.device("cpu")
# (scheduler, guidance, spacing): the stochastic samplers with and without guidance, and their spacings
CASES = [
    ("euler-a", 7.5, "default"),
    ("euler-a", 0.0, "trailing"),
    ("lcm", 2.0, "default"),
    ("tcd", 1.0, "default"),
]


def make(**kw) -> DiffusionGenerator:
    settings = dict(resolution=32, steps=4, guidance=7.5, batch_size=3, compile="off")
    settings.update(kw)
    return DiffusionGenerator(GeneratorConfig(**settings), "tiny", 32, CPU)


def as_uint8(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((image * 255).round().astype(np.uint8)).permute(2, 0, 1)


@pytest.mark.parametrize("scheduler, guidance, spacing", CASES)
def test_every_scheduler_equals_the_diffusers_pipeline_within_one_level(tiny_pipe, scheduler, guidance, spacing):
    """The oracle: diffusers' own pipeline, its scheduler built as its docs do (Cls.from_config(pipe's config))."""
    import diffusers

    gen = make(scheduler=scheduler, guidance=guidance, timestep_spacing=spacing)
    ours = gen.generate(PROMPTS, SEEDS)
    cls = {"euler-a": "EulerAncestralDiscreteScheduler", "lcm": "LCMScheduler", "tcd": "TCDScheduler"}
    extra = {} if spacing == "default" else {"timestep_spacing": spacing}
    made = getattr(diffusers, cls[scheduler]).from_config(tiny_pipe.scheduler.config, **extra)
    assert type(gen.pipe.scheduler) is type(made)
    tiny_pipe.scheduler = made
    for i, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS)):
        ref = tiny_pipe(
            prompt,
            generator=torch.Generator().manual_seed(seed),
            num_inference_steps=4,
            guidance_scale=guidance,
            eta=0.3 if scheduler == "tcd" else 0.0,  # TCD's gamma, diffusers' TCD docs
            height=32,
            width=32,
            output_type="np",
        ).images[0]
        assert (ours[i].int() - as_uint8(ref).int()).abs().max() <= 1, f"sample {i}"


@pytest.mark.parametrize("scheduler, guidance", [("euler-a", 7.5), ("lcm", 1.0), ("tcd", 0.0)])
def test_a_sample_is_identical_alone_in_a_full_batch_and_in_a_padded_partial_batch(scheduler, guidance):
    """LCM, TCD and Euler-a draw noise at every step: from the sample's own generator, never the batch's.

    Equal to the level, not bit for bit: a CPU kernel may round a row differently at another batch
    position (measured at 64 px: 1 pixel of 12288 off by one level); wrong per-step noise moves pixels by
    tens of levels (the control below)."""
    gen = make(scheduler=scheduler, guidance=guidance)
    full = gen.generate(PROMPTS, SEEDS)
    alone = gen.generate(PROMPTS[1:2], SEEDS[1:2])  # padded with two copies of itself
    partial = gen.generate(PROMPTS[1:], SEEDS[1:])  # two samples, padded with one
    others = gen.generate([PROMPTS[2], PROMPTS[0], PROMPTS[1]], [SEEDS[2], 5, SEEDS[1]])  # moved, new neighbour
    for a, b in ((alone[0], full[1]), (partial[0], full[1]), (partial[1], full[2]), (others[2], full[1])):
        assert (a.int() - b.int()).abs().max() <= 1
    assert (others[0].int() - full[2].int()).abs().max() <= 1
    assert (others[1].int() - full[0].int()).abs().max() > 8  # another seed: another image


def test_per_step_noise_comes_from_the_samples_generator(tiny_pipe):
    """A control showing the test above can fail: one shared generator for the batch's per-step noise
    (the initial latents still per sample) makes sample 1's image depend on its neighbours."""
    from diffusers import EulerAncestralDiscreteScheduler

    gen = make(scheduler="euler-a")
    shared = []
    original = gen.pipe.scheduler.step

    def step(*args, generator=None, **kw):  # the batch's noise from one generator
        if not shared:
            shared.append(torch.Generator().manual_seed(0))
        return original(*args, generator=shared[0], **kw)

    gen.pipe.scheduler.step = step
    a = gen.generate(PROMPTS, SEEDS)
    shared.clear()
    b = gen.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [SEEDS[1], 5, 6])  # sample 1 first
    assert isinstance(gen.pipe.scheduler, EulerAncestralDiscreteScheduler)
    assert (a[1].int() - b[0].int()).abs().max() > 8


@pytest.mark.parametrize("scheduler, guidance", [("lcm", 1.0), ("euler-a", 0.0)])
def test_no_guidance_path_is_safe_under_cuda_graph_replays(monkeypatch, scheduler, guidance):
    """Without guidance the UNet's output goes to the scheduler as it is: a replayed graph's buffer
    must be copied out (FreshOutputs), emulated on a CPU with ReplayedOutputs."""
    eager = make(scheduler=scheduler, guidance=guidance).generate(PROMPTS, SEEDS)
    monkeypatch.setattr(torch, "compile", lambda module, **kw: ReplayedOutputs(module))
    graphs = make(scheduler=scheduler, guidance=guidance, compile="on")
    assert torch.equal(graphs.generate(PROMPTS, SEEDS), eager)


def test_timestep_spacing_and_eta_reach_the_scheduler():
    gen = make(scheduler="euler-a", timestep_spacing="trailing", guidance=0.0)
    assert gen.pipe.scheduler.config.timestep_spacing == "trailing"
    gen.pipe.scheduler.set_timesteps(4)
    assert int(gen.pipe.scheduler.timesteps[0]) == 999  # trailing: the first step at the last timestep
    assert resolved_eta(GeneratorConfig(scheduler="tcd")) == 0.3
    assert resolved_eta(GeneratorConfig(scheduler="tcd", eta=0.0)) == 0.0
    assert resolved_eta(GeneratorConfig(scheduler="ddim")) == 0.0
    a = make(scheduler="tcd", guidance=0.0).generate(PROMPTS[:1], SEEDS[:1])
    b = make(scheduler="tcd", guidance=0.0, eta=0.0).generate(PROMPTS[:1], SEEDS[:1])
    assert not torch.equal(a, b)  # gamma 0.3 draws noise at every step; gamma 0 does not


def test_steps_beyond_what_the_scheduler_supports_are_refused_before_start():
    with pytest.raises(UsageError, match=r"--generator.steps 60 does not work with --generator.scheduler lcm"):
        check_sampling(GeneratorConfig(scheduler="lcm", steps=60), "tiny")
    with pytest.raises(UsageError, match=r"--generator.steps 1200 .* ddim"):
        check_sampling(GeneratorConfig(scheduler="ddim", steps=1200), "tiny")
    with pytest.raises(UsageError, match=r"--generator.eta is read by the ddim and tcd schedulers only"):
        check_sampling(GeneratorConfig(scheduler="lcm", steps=4, eta=0.5), "tiny")
    check_sampling(GeneratorConfig(scheduler="lcm", steps=8), "tiny")
    check_sampling(GeneratorConfig(scheduler="tcd", steps=4, eta=0.5), "tiny")
