"""Write configs/paper/: one config per synthetic row of the paper's Tab. 1 and its stream twin.

    python scripts/paper_configs.py            # rewrites configs/paper/*.yaml
    python scripts/paper_configs.py --check    # exit 1 if a file differs from what this writes

Every figure in the files comes from here and from `streamgen.train.budget` (the throughput a
budget is planned on): the cache row's budget is its build plus its own recipe's training, the
stream twin's max_steps about what that budget buys at 7 generators : 1 trainer.
tests/test_paper_configs.py checks the files equal this script's output and the rows the paper's.

The recipe, t-ReX's (naver/trex main.py): a global batch of 256 (t-ReX: 4 GPUs x 64) with the LR
scaled linearly (0.1 per 256), warm-up over 10% of training, SyncBatchNorm over the trainer ranks.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamgen.cache.layout import REAL_SIZES  # noqa: E402
from streamgen.cache.reader import steps_per_epoch  # noqa: E402
from streamgen.config import RunConfig  # noqa: E402
from streamgen.train import budget  # noqa: E402

PAPER = ROOT / "configs" / "paper"
GLOBAL_BATCH = 256  # t-ReX: 4 x 64
WARMUP_FRACTION = 0.1  # t-ReX: 10 of 100 epochs
GENERATORS, TRAINERS = 7, 1  # the command line the files suggest (one 8-GPU node)
EPOCHS_AT_1X = 100  # as many images seen at every cache size: epochs = 100 / scale

# (dataset, row): (prompt, guidance, scale, recipe, real class counts), the paper's Tab. 1
ROWS = {
    ("in100", 2): ("c", 7.5, 1, "single", False),
    ("in100", 3): ("c_hc", 7.5, 1, "single", False),
    ("in100", 4): ("c_dc", 7.5, 1, "single", False),
    ("in100", 5): ("c_hc_b", 7.5, 1, "single", False),
    ("in100", 6): ("c", 2.0, 1, "single", False),
    ("in100", 7): ("c_hc", 2.0, 1, "single", False),
    ("in100", 8): ("c_dc", 2.0, 1, "single", False),
    ("in100", 9): ("c_hc_b", 2.0, 1, "single", False),
    ("in100", 10): ("c_hc_b", 2.0, 1, "multicrop", False),
    ("in100", 11): ("c_hc_b", 2.0, 1, "multicrop", True),
    ("in100", 12): ("c_hc_b", 2.0, 10, "multicrop", False),
    ("in1k", 15): ("c_hc_b", 2.0, 1, "multicrop", True),
    ("in1k", 16): ("c_hc_b", 2.0, 20, "multicrop", False),
    ("in1k", 17): ("c_hc_b", 2.0, 50, "multicrop", False),
}
CLASSES = {"in100": "imagenet100", "in1k": "imagenet1k"}
DATASET_NAMES = {"in100": "ImageNet-100", "in1k": "ImageNet-1K"}
PROMPTS = {"c": '"c"', "c_hc": '"c, h_c"', "c_dc": '"c, d_c"', "c_hc_b": '"c, h_c inside b"'}


def _guidance(g: float) -> str:
    return f"{g:g}"


def names(row: tuple[str, int]) -> tuple[str, str]:
    """(config name, cache folder) of a row."""
    dataset, number = row
    prompt, guidance, scale, recipe, counts = ROWS[row]
    tail = "_realcounts" if counts else ""
    return (
        f"{dataset}_r{number:02d}_{prompt}_g{_guidance(guidance)}_{scale}x_{recipe}{tail}",
        f"caches/{dataset}_{prompt}_g{_guidance(guidance)}_{scale}x{tail}",
    )


def row_config(row: tuple[str, int], source: str) -> RunConfig:
    """The row's settings as a RunConfig (budget and schedule filled in by `plan`)."""
    dataset, _ = row
    prompt, guidance, scale, recipe, counts = ROWS[row]
    cfg = RunConfig()
    cfg.name = names(row)[0] + ("_stream" if source == "stream" else "")
    cfg.classes, cfg.prompt, cfg.source = CLASSES[dataset], prompt, source
    cfg.class_counts = "/data/imagenet/train" if counts else None
    cfg.generator.guidance = guidance
    cfg.stream.batch_size = GLOBAL_BATCH // TRAINERS
    cfg.train.augment, cfg.train.head = recipe, ("trex" if recipe == "multicrop" else "linear")
    cfg.train.warmup_fraction = WARMUP_FRACTION
    cfg.train.sync_batchnorm = True
    if source == "cache":
        cfg.cache.scale, cfg.cache.dir = scale, names(row)[1]
        cfg.train.epochs = EPOCHS_AT_1X // scale
    return cfg


def cache_images(cfg: RunConfig) -> int:
    """The cache's size: scale x the real training set, rounded up to whole global batches."""
    n = math.ceil(cfg.cache.scale * REAL_SIZES[cfg.classes])
    return -(-n // cfg.stream.batch_size) * cfg.stream.batch_size


def plan(row: tuple[str, int]) -> tuple[RunConfig, RunConfig, dict]:
    """The row's cache config and stream twin, budgets and schedules decided; and the figures."""
    cache, stream = row_config(row, "cache"), row_config(row, "stream")
    images = cache_images(cache)
    steps = steps_per_epoch(images, TRAINERS, cache.stream.batch_size)
    cache.train.max_steps = cache.train.epochs * steps  # what check_cache_run derives
    build = budget.cache_build_hours(images)
    training = budget.cache_train_hours(cache.train, cache.train.epochs * images)
    hours = math.ceil(build + training)
    cache.train.budget_gpu_hours = stream.train.budget_gpu_hours = hours
    stream.train.max_steps = budget.budget_steps(stream, GENERATORS, TRAINERS)
    figures = {"images": images, "build": build, "training": training, "hours": hours}
    return cache, stream, figures


def _describe(row: tuple[str, int]) -> str:
    dataset, number = row
    prompt, guidance, scale, recipe, counts = ROWS[row]
    size = f"{scale}x the real size" + (" with its class imbalance" if counts else "")
    how = "multi-crop + t-ReX head" if recipe == "multicrop" else "single crop, linear head"
    return f"Tab. 1 row {number} ({DATASET_NAMES[dataset]}): prompt {PROMPTS[prompt]}, guidance {_guidance(guidance)}, {size}, {how}"


RECIPE_NOTE = (
    "# Recipe (t-ReX, naver/trex main.py): global batch 256 (t-ReX: 4 GPUs x 64), lr 0.1 per 256 images\n"
    "# (scaled linearly with the global batch), warm-up over 10% of training, SyncBatchNorm when there is\n"
    "# more than one trainer. On T trainer GPUs keep the global batch: --trainers T --stream.batch_size 256/T.\n"
    "# Crops come from 256 px stream images (SD makes 512): a global crop under 77% of the image is\n"
    "# upsampled to 224 px; --stream.resolution 512 avoids it at 4x the queue memory, the cache's disk and\n"
    "# the multi-crop's time (bench/recipe.py; README, 'Crops from the generator's resolution').\n"
)


def _body(cfg: RunConfig) -> str:
    t = cfg.train
    lines = [
        f"name: {cfg.name}",
        f"seed: {cfg.seed}",
        f"classes: {cfg.classes}",
    ]
    if cfg.class_counts:
        lines.append(
            f"class_counts: {cfg.class_counts}   # the real train tree: same size, same imbalance (edit the path)"
        )
    lines += [
        f"prompt: {cfg.prompt}",
        f"model: {cfg.model}",
        "generator:",
        f"  resolution: {cfg.generator.resolution}",
        f"  steps: {cfg.generator.steps}",
        f"  guidance: {_guidance(cfg.generator.guidance)}",
        f"  batch_size: {cfg.generator.batch_size}",
        "stream:",
        f"  resolution: {cfg.stream.resolution}",
        f"  batch_size: {cfg.stream.batch_size}",
        f"source: {cfg.source}",
    ]
    if cfg.source == "cache":
        lines += ["cache:", f"  scale: {cfg.cache.scale}", f"  dir: {cfg.cache.dir}"]
    lines += ["train:", f"  arch: {t.arch}"]
    lines.append(f"  epochs: {t.epochs}" if cfg.source == "cache" else f"  max_steps: {t.max_steps}")
    lines += [
        f"  warmup_fraction: {t.warmup_fraction:g}",
        f"  augment: {t.augment}",
        f"  head: {t.head}",
        f"  sync_batchnorm: {str(t.sync_batchnorm).lower()}",
        f"  label_smoothing: {t.label_smoothing:.1f}",
        f"  crop: {t.crop}",
        f"  lr: {t.lr:g}",
        f"  budget_gpu_hours: {t.budget_gpu_hours}",
        "  # val_dir: /data/imagenet/val",
    ]
    return "\n".join(lines) + "\n"


def render(row: tuple[str, int]) -> dict[str, str]:
    """File name -> text, for the row's two configs."""
    cache, stream, f = plan(row)
    name = cache.name
    rate = budget.trainer_images_per_s(cache.train)
    cost = budget.recipe_cost(cache.train)
    head = (
        f"# {_describe(row)}.\n"
        f"# The paper's protocol: a fixed synthetic set ({f['images']:,} images) trained for {cache.train.epochs} epochs.\n"
        f"# Budget: building the cache ~{f['build']:.1f} GPU-h at {budget.GENERATOR_IMAGES_PER_S:g} images/s per GPU + training\n"
        f"# ~{f['training']:.1f} GPU-h at {rate:.0f} images/s (this recipe's step costs {cost:.2f}x a single 224 px crop's)\n"
        f"# = {f['hours']} GPU-hours (figures: streamgen/train/budget.py); its stream twin at the same budget:\n"
        f"# configs/paper/{name}_stream.yaml. Row settings: tests/test_paper_configs.py.\n"
        + RECIPE_NOTE
        + f"#   python train.py --config configs/paper/{name}.yaml --generators {GENERATORS} --trainers {TRAINERS} "
        f"--cache.dir /local/ssd/{name}\n"
    )
    twin_head = (
        f"# The stream twin of {name}.yaml: {_describe(row)}, but every image new and seen\n"
        f"# once, stopped at the same budget ({f['hours']} GPU-hours held by generators and trainers).\n"
        f"# max_steps shapes the schedule: the steps the budget buys with {GENERATORS} generators : {TRAINERS} trainer at\n"
        f"# {budget.GENERATOR_IMAGES_PER_S:g} images/s per generator ({stream.train.max_steps:,} steps of {GLOBAL_BATCH}); "
        "the budget stops the run.\n"
        + RECIPE_NOTE
        + f"#   python train.py --config configs/paper/{name}_stream.yaml --generators {GENERATORS} --trainers {TRAINERS}\n"
    )
    return {f"{name}.yaml": head + _body(cache), f"{name}_stream.yaml": twin_head + _body(stream)}


def render_all() -> dict[str, str]:
    files: dict[str, str] = {}
    for row in sorted(ROWS):
        files.update(render(row))
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if configs/paper differs from this output")
    args = parser.parse_args()
    files = render_all()
    if args.check:
        stale = [
            name for name, text in files.items() if not (PAPER / name).is_file() or (PAPER / name).read_text() != text
        ]
        extra = sorted({p.name for p in PAPER.glob("*.yaml")} - set(files))
        for name in stale + extra:
            print(f"configs/paper/{name}: differs from scripts/paper_configs.py's output", file=sys.stderr)
        return 1 if stale or extra else 0
    for name, text in files.items():
        (PAPER / name).write_text(text)
    print(f"wrote {len(files)} configs in {PAPER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
