"""What a GPU-hour budget buys: the one place for the throughput a budget is planned on.

The paper configs (``scripts/paper_configs.py``) derive their budgets and their stream twins'
``max_steps`` from these figures, and the launcher warns at start when a run's
``--train.budget_gpu_hours`` will stop it before its LR schedule ends (`schedule_warning`).
They are assumptions about GPUs, not measurements of this machine; change them here.

- A generator GPU makes ``GENERATOR_IMAGES_PER_S`` images (SD v1.4, 50 steps, 512 px: the
  figure bench/gpu_session.py checks on an H100).
- A trainer GPU trains ``TRAINER_IMAGES_PER_S`` images a second with one 224 px crop each
  (ResNet-50, bf16); a recipe's step costs its crops' pixels over 224 x 224 times that
  (`recipe_cost`): a ResNet's FLOPs are proportional to its input's pixels, so t-ReX's
  1 x 224 + 8 x 96 multi-crop costs 2.47 single-crop steps (tests/train/test_budget.py
  checks the ratio against torch's FLOP counter on ResNet-50).

Device-hours are counted as `streamgen.train.compute` counts them: a stream run holds its
generators and trainers for the whole run; a cache run holds the generators while it builds
the cache, then only its trainers.
"""

from __future__ import annotations

import math

from streamgen.config import RunConfig, TrainConfig, local_crop_size

GENERATOR_IMAGES_PER_S = 5.0  # per generator GPU, the paper's generation settings
TRAINER_IMAGES_PER_S = 2000.0  # per trainer GPU, one 224 px crop per image
REFERENCE_CROP = 224


def recipe_cost(train: TrainConfig) -> float:
    """A step's cost per image relative to one 224 px crop: the pixels the backbone sees."""
    pixels = train.crop**2
    if train.augment == "multicrop":
        pixels = train.global_crops * train.crop**2 + train.local_crops * local_crop_size(train) ** 2
    return pixels / REFERENCE_CROP**2


def trainer_images_per_s(train: TrainConfig) -> float:
    """Images a second one trainer GPU takes in with this recipe."""
    return TRAINER_IMAGES_PER_S / recipe_cost(train)


def warmup_steps(train: TrainConfig, steps_per_epoch: int | None = None) -> int:
    """The LR warm-up in steps: a fraction of max_steps, epochs of the cache, or steps as given."""
    if train.warmup_fraction is not None:
        return round(train.warmup_fraction * train.max_steps)
    if train.warmup_epochs is not None and steps_per_epoch is not None:
        return train.warmup_epochs * steps_per_epoch
    return train.warmup_steps


def cache_build_hours(images: int) -> float:
    """Generator GPU-hours to build a cache of ``images``."""
    return images / GENERATOR_IMAGES_PER_S / 3600


def cache_train_hours(train: TrainConfig, images_seen: int) -> float:
    """Trainer GPU-hours for a cache run to train on ``images_seen`` images."""
    return images_seen / trainer_images_per_s(train) / 3600


def stream_images_per_s(train: TrainConfig, generators: int, trainers: int) -> float:
    """A stream run's pace: the slower of its generators and its trainers."""
    return min(generators * GENERATOR_IMAGES_PER_S, trainers * trainer_images_per_s(train))


def budget_steps(cfg: RunConfig, generators: int, world: int, cache_images: int | None = None) -> int | None:
    """About how many steps ``train.budget_gpu_hours`` pays for (None without a budget):
    ``generators`` and ``world`` count every node's; ``cache_images`` for a cache run (its build
    is paid from the same budget)."""
    t = cfg.train
    if t.budget_gpu_hours is None:
        return None
    seconds = t.budget_gpu_hours * 3600
    images_per_step = cfg.stream.batch_size * world
    if cfg.source == "cache":
        left = seconds - cache_build_hours(cache_images or 0) * 3600
        # the trainers are held alone: world GPUs, each taking its share of the step
        return max(0, math.floor(left / (images_per_step / trainer_images_per_s(t))))
    step_seconds = images_per_step / stream_images_per_s(t, generators, world)
    return math.floor(seconds / ((generators + world) * step_seconds))


def schedule_warning(cfg: RunConfig, generators: int, world: int, cache_images: int | None = None) -> str | None:
    """A warning when the budget will stop the run before its LR schedule ends (max_steps), else None."""
    steps = budget_steps(cfg, generators, world, cache_images)
    if steps is None or steps >= cfg.train.max_steps:
        return None
    return (
        f"--train.budget_gpu_hours {cfg.train.budget_gpu_hours:g} will stop this run near step {steps:,} of "
        f"{cfg.train.max_steps:,}, before its learning rate has decayed (at the rates assumed in "
        f"streamgen/train/budget.py: {GENERATOR_IMAGES_PER_S:g} images/s per generator, "
        f"{trainer_images_per_s(cfg.train):.0f} per trainer with this recipe): set --train.max_steps {steps} "
        "to end the schedule with the budget, or raise the budget"
    )
