"""--generator.deepcache and --generator.tome against their packages' own reference calls."""

import importlib.util

import numpy as np
import pytest
import torch

from streamgen.config import GeneratorConfig
from streamgen.errors import UsageError
from streamgen.generate.diffusion import DiffusionGenerator, check_generator, compiles
from streamgen.generate.pipeline import build_tiny_pipeline

PROMPTS = ["papillon", "pirate, pirate ship, ship", "tabby, tabby cat inside hockey arena"]
SEEDS = [11, 22, 33]
CPU = torch.device("cpu")
needs_deepcache = pytest.mark.skipif(
    importlib.util.find_spec("DeepCache") is None,
    reason="DeepCache is not installed (pip install 'streamgen[deepcache]')",
)
needs_tome = pytest.mark.skipif(
    importlib.util.find_spec("tomesd") is None, reason="tomesd is not installed (pip install 'streamgen[tome]')"
)


def make(**kw) -> DiffusionGenerator:
    settings = dict(resolution=32, steps=6, guidance=7.5, batch_size=3, compile="off")
    settings.update(kw)
    return DiffusionGenerator(GeneratorConfig(**settings), "tiny", 32, CPU)


def reference(pipe, n: int = 2) -> torch.Tensor:
    images = []
    for prompt, seed in zip(PROMPTS[:n], SEEDS[:n]):
        out = pipe(
            prompt,
            generator=torch.Generator().manual_seed(seed),
            num_inference_steps=6,
            guidance_scale=7.5,
            height=32,
            width=32,
            output_type="np",
        ).images[0]
        images.append(torch.from_numpy((out * 255).round().astype(np.uint8)).permute(2, 0, 1))
    return torch.stack(images)


@needs_deepcache
def test_deepcache_equals_its_own_helper_on_the_plain_pipeline():
    from DeepCache import DeepCacheSDHelper

    ours = make(deepcache=3).generate(PROMPTS, SEEDS)
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    helper = DeepCacheSDHelper(pipe=pipe)  # DeepCache's README example
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    assert (ours[:2].int() - reference(pipe).int()).abs().max() <= 1
    assert (ours.int() - make().generate(PROMPTS, SEEDS).int()).abs().max() > 8  # it caches something


@needs_tome
def test_tome_equals_tomesd_on_the_plain_pipeline_and_keeps_samples_independent_of_their_batch():
    import tomesd

    gen = make(tome=0.5)
    ours = gen.generate(PROMPTS, SEEDS)
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    tomesd.apply_patch(pipe, ratio=0.5, use_rand=False)
    assert (ours[:2].int() - reference(pipe).int()).abs().max() <= 1
    assert gen.pipe.unet._tome_info["args"]["ratio"] == 0.5 and not gen.pipe.unet._tome_info["args"]["use_rand"]
    # it merges something: a few levels on random weights (measured 3), beyond the oracle's 1 level
    assert (ours.int() - make().generate(PROMPTS, SEEDS).int()).abs().max() > 1
    alone = gen.generate(PROMPTS[1:2], SEEDS[1:2])
    assert (alone[0].int() - ours[1].int()).abs().max() <= 1


def test_compile_auto_leaves_the_unet_eager_with_either():
    assert compiles(GeneratorConfig(), "cuda")
    assert not compiles(GeneratorConfig(deepcache=3), "cuda")
    assert not compiles(GeneratorConfig(tome=0.5), "cuda")


@needs_deepcache
@needs_tome
def test_compile_on_with_either_is_refused_in_one_line():
    with pytest.raises(UsageError, match=r"--generator.deepcache cannot run under --generator.compile on"):
        check_generator(GeneratorConfig(deepcache=3, compile="on"), "cuda")
    with pytest.raises(UsageError, match=r"--generator.tome cannot run under --generator.compile on"):
        check_generator(GeneratorConfig(tome=0.5, compile="on"), "cuda")


def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("DeepCache", "tomesd") else real(name, *a)
    )
    with pytest.raises(UsageError, match=r"--generator.deepcache needs the DeepCache package.*streamgen\[deepcache\]"):
        check_generator(GeneratorConfig(deepcache=3), "cpu")
    with pytest.raises(UsageError, match=r"--generator.tome needs the tomesd package.*streamgen\[tome\]"):
        check_generator(GeneratorConfig(tome=0.5), "cpu")


@needs_deepcache
@needs_tome
@pytest.mark.parametrize("speedup", ["deepcache", "tome"])
def test_neither_compiles_whole_graph(speedup):
    """The measurement behind the refusal: torch.compile(fullgraph=True) of the patched UNet fails (at
    tracing, so a CPU shows it in seconds)."""
    gen = make(**{speedup: 3 if speedup == "deepcache" else 0.5}, steps=2)
    gen.pipe.unet = torch.compile(gen.pipe.unet, fullgraph=True)
    with pytest.raises(Exception, match="Data-dependent branching|RemovableHandle"):
        gen.generate(PROMPTS, SEEDS)
