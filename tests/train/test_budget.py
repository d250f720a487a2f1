"""What a budget buys (streamgen.train.budget): the recipe's cost, the warm-up, the start-up warning."""

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from streamgen.config import RunConfig, TrainConfig, parse_config
from streamgen.train.budget import (
    budget_steps,
    recipe_cost,
    schedule_warning,
    trainer_images_per_s,
    warmup_steps,
)


def _flops(model: torch.nn.Module, *shapes: tuple[int, int]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for count, size in shapes:
            model(torch.zeros(count, 3, size, size))
    return counter.get_total_flops()


def test_a_multicrop_step_costs_what_resnet50s_flops_say():
    """t-ReX's 1 x 224 + 8 x 96 crops against one 224 crop, counted by torch's FLOP counter (the oracle)."""
    model = torchvision.models.resnet50().eval()
    measured = _flops(model, (1, 224), (8, 96)) / _flops(model, (1, 224))
    multicrop = TrainConfig(augment="multicrop")
    assert recipe_cost(multicrop) == pytest.approx(measured, rel=0.03)  # ~2.47 (the fc layer is the rest)
    assert recipe_cost(TrainConfig()) == 1.0
    assert trainer_images_per_s(multicrop) == pytest.approx(2000 / recipe_cost(multicrop))


def test_warmup_as_a_fraction_of_training_epochs_or_steps():
    assert warmup_steps(TrainConfig(max_steps=500, warmup_fraction=0.1)) == 50
    assert warmup_steps(TrainConfig(max_steps=500, warmup_epochs=2), steps_per_epoch=50) == 100
    assert warmup_steps(TrainConfig(max_steps=500, warmup_steps=7)) == 7
    assert warmup_steps(TrainConfig(max_steps=500, warmup_fraction=0.0, warmup_steps=7)) == 0


def _stream(**train) -> RunConfig:
    cfg = parse_config(["--stream.batch_size", "256", "--train.budget_gpu_hours", "100"])
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_the_budget_warning_comes_when_the_budget_ends_the_run_before_its_schedule():
    cfg = _stream()
    # 7 generators x 5 images/s feed 35 images/s; 8 GPUs held: 100 GPU-h = 12.5 h x 35 / 256 steps
    assert budget_steps(cfg, 7, 1) == int(100 / 8 * 3600 * 35 / 256)
    cfg.train.max_steps = budget_steps(cfg, 7, 1)
    assert schedule_warning(cfg, 7, 1) is None
    cfg.train.max_steps += 1000
    warning = schedule_warning(cfg, 7, 1)
    assert warning is not None and f"near step {budget_steps(cfg, 7, 1):,}" in warning and "\n" not in warning
    assert schedule_warning(_stream(budget_gpu_hours=None), 7, 1) is None  # no budget, nothing to say


def test_a_cache_runs_budget_pays_for_the_build_first_and_multicrop_steps_cost_more():
    cfg = _stream()
    cfg.source = "cache"
    single = budget_steps(cfg, 7, 1, cache_images=1_000_000)  # 100 GPU-h - 55.6 h of building
    assert single == int((100 * 3600 - 1_000_000 / 5) / (256 / 2000))
    cfg.train.augment = "multicrop"
    assert budget_steps(cfg, 7, 1, cache_images=1_000_000) == int(
        (100 * 3600 - 200_000) / (256 / (2000 / ((224**2 + 8 * 96**2) / 224**2)))
    )
    assert budget_steps(cfg, 7, 1, cache_images=100_000_000) == 0  # the build alone spends it


def test_the_launcher_warns_at_start_on_gpus_only(capsys):
    from types import SimpleNamespace

    from streamgen.launch.launcher import warn_about_the_budget

    cfg = _stream(max_steps=10**7)
    job = SimpleNamespace(cfg=cfg, accelerator="gpu", cache=None, placement=SimpleNamespace(nodes=1), world=1)
    assert warn_about_the_budget(job) is not None
    assert "streamgen: warning: --train.budget_gpu_hours 100 will stop this run" in capsys.readouterr().err
    job.accelerator = "cpu"  # the rates assumed are GPUs'
    assert warn_about_the_budget(job) is None and capsys.readouterr().err == ""
