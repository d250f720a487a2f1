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
