"""One config per synthetic row of the paper's Tab. 1, and its stream twin at the same budget.

The table below is the settings of each row as this project reads the paper (Sariyildiz et al.,
CVPR 2023, Tab. 1): class set, prompt family, guidance scale, size of the fixed synthetic set
(x the real training set), recipe (single crop, or multi-crop with the t-ReX head) and whether the
set follows the real dataset's class imbalance. SD v1.4, 50 steps, ResNet-50 everywhere.
"""

from pathlib import Path

import pytest

from streamgen.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"

# row: (classes, prompt, guidance, scale, recipe, real class counts)
TAB1 = {
    ("in100", 2): ("imagenet100", "c", 7.5, 1, "single", False),
    ("in100", 3): ("imagenet100", "c_hc", 7.5, 1, "single", False),
    ("in100", 4): ("imagenet100", "c_dc", 7.5, 1, "single", False),
    ("in100", 5): ("imagenet100", "c_hc_b", 7.5, 1, "single", False),
    ("in100", 6): ("imagenet100", "c", 2.0, 1, "single", False),
    ("in100", 7): ("imagenet100", "c_hc", 2.0, 1, "single", False),
    ("in100", 8): ("imagenet100", "c_dc", 2.0, 1, "single", False),
    ("in100", 9): ("imagenet100", "c_hc_b", 2.0, 1, "single", False),
    ("in100", 10): ("imagenet100", "c_hc_b", 2.0, 1, "multicrop", False),
    ("in100", 11): ("imagenet100", "c_hc_b", 2.0, 1, "multicrop", True),
    ("in100", 12): ("imagenet100", "c_hc_b", 2.0, 10, "multicrop", False),
    ("in1k", 15): ("imagenet1k", "c_hc_b", 2.0, 1, "multicrop", True),
    ("in1k", 16): ("imagenet1k", "c_hc_b", 2.0, 20, "multicrop", False),
    ("in1k", 17): ("imagenet1k", "c_hc_b", 2.0, 50, "multicrop", False),
}


def row_configs() -> dict[tuple[str, int], Path]:
    found = {}
    for path in sorted(PAPER.glob("*.yaml")):
        if path.stem.endswith("_stream"):
            continue
        dataset, row = path.stem.split("_")[:2]
        found[dataset, int(row[1:])] = path
    return found


def test_every_synthetic_row_has_a_config():
    assert set(row_configs()) == set(TAB1)


@pytest.mark.parametrize("row", sorted(TAB1), ids=lambda r: f"{r[0]}-row{r[1]}")
def test_row_config_matches_the_paper_and_its_stream_twin_the_budget(row):
    classes, prompt, guidance, scale, recipe, real_counts = TAB1[row]
    path = row_configs()[row]
    cfg = parse_config(["--config", str(path)])  # every key known, every value valid
    assert (cfg.classes, cfg.prompt, cfg.generator.guidance) == (classes, prompt, guidance)
    assert (cfg.model, cfg.generator.steps, cfg.generator.resolution) == ("CompVis/stable-diffusion-v1-4", 50, 512)
    assert cfg.train.arch == "resnet50" and cfg.train.label_smoothing == 0.0
    assert (cfg.source, cfg.cache.scale) == ("cache", scale)
    assert cfg.train.augment == recipe and cfg.train.head == ("trex" if recipe == "multicrop" else "linear")
    assert (cfg.class_counts is not None) == real_counts
    assert cfg.train.epochs is not None and cfg.train.epochs * scale == 100  # as many images seen at every size
    assert cfg.name == path.stem and f"r{row[1]:02d}" in cfg.name

    twin = parse_config(["--config", str(path.with_name(path.stem + "_stream.yaml"))])
    assert twin.source == "stream" and twin.train.budget_gpu_hours == cfg.train.budget_gpu_hours > 0
    same = ("classes", "class_counts", "prompt", "model", "seed")
    assert all(getattr(twin, k) == getattr(cfg, k) for k in same)
    assert twin.generator == cfg.generator and twin.stream == cfg.stream
    for key in ("arch", "augment", "head", "label_smoothing", "crop", "lr"):
        assert getattr(twin.train, key) == getattr(cfg.train, key), key


def _paper_configs_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_configs", ROOT / "scripts" / "paper_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_files_are_what_scripts_paper_configs_writes():
    script = _paper_configs_script()
    files = script.render_all()
    assert sorted(files) == sorted(p.name for p in PAPER.glob("*.yaml"))
    for name, text in files.items():
        assert (PAPER / name).read_text() == text, f"{name}: run python scripts/paper_configs.py"
    assert {(d, r) for d, r in script.ROWS} == set(TAB1)  # the script's rows are the paper's


@pytest.mark.parametrize("path", sorted(PAPER.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_paper_config_follows_trex_and_its_budget_outlasts_its_schedule(path):
    """t-ReX (naver/trex main.py): global batch 256 (4 x 64) with lr 0.1 per 256, warm-up over 10% of
    training (rows 16 and 17 too: 5 and 2 epochs), SyncBatchNorm over ranks; and the budget, at the
    rates of streamgen/train/budget.py, does not stop a run before its LR schedule ends."""
    from streamgen.cache.layout import cache_images
    from streamgen.cache.reader import steps_per_epoch
    from streamgen.train.budget import budget_steps, schedule_warning, warmup_steps

    cfg = parse_config(["--config", str(path)])
    t = cfg.train
    assert cfg.stream.batch_size * cfg.trainers == 256 and t.lr == 0.1 and t.sync_batchnorm
    assert t.warmup_fraction == 0.1 and t.warmup_epochs is None
    images = None
    if cfg.source == "cache":
        images = cache_images(cfg, 100 if cfg.classes == "imagenet100" else 1000, None)
        t.max_steps = t.epochs * steps_per_epoch(images, 1, cfg.stream.batch_size)  # as check_cache_run
    assert warmup_steps(t) == round(0.1 * t.max_steps)
    assert schedule_warning(cfg, 7, 1, images) is None
    if cfg.source == "stream":  # the twin's schedule ends with its budget: within one step
        assert budget_steps(cfg, 7, 1) == t.max_steps
    text = path.read_text()
    assert "global batch 256" in text and "SyncBatchNorm" in text and "--stream.resolution 512" in text
