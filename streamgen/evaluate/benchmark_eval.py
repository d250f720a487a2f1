"""Evaluation of a trained checkpoint on the ImageNet benchmarks (the paper's Tab. 1).

A benchmark folder (`streamgen.evaluate.benchmarks`: ImageNet-val, -V2, -Sketch, -R, -A as released, or
any folder of one sub-folder per class key) is scored on the classes it shares with the model:
a model trained on ImageNet-100 evaluated on the full ImageNet-val scores its 100 classes, and
the result says how many classes and images were scored. Predictions are made among all the
model's classes, except on ImageNet-R and -A, whose protocol predicts among the benchmark's own
classes (those the model knows); ``all_classes=True`` lifts that restriction. For a model that
knows more classes than it shares with ImageNet-R or -A (an ImageNet-100 model shares 19 / 15 of
them) the two prediction sets give different scores, and the paper ("metrics only on the common
classes") does not say which it reports: both are computed in one pass (``other_top1``) and the
Tab. 1 table prints both, labelled.

Images get the standard ImageNet evaluation transform (resize the shorter side to
``crop / 0.875``, centre crop, normalise) at the crop the model was trained with
(`training_crop`). Unreadable images are skipped and counted (`streamgen.evaluate.realdata`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from streamgen.errors import UsageError
from streamgen.evaluate.benchmarks import Benchmark
from streamgen.evaluate.realdata import CountSkipped, ImageList, drop_unreadable
from streamgen.train.augment import IMAGENET_MEAN, IMAGENET_STD
from streamgen.train.model import Classifier, topk_correct

DEFAULT_CROP = 224
CROP_RATIO = 0.875  # the ImageNet habit: resize to crop / 0.875 (256 for 224), then centre crop


@dataclass
class Result:
    """One benchmark's scores and what was scored."""

    dataset: str  # in-val, in-v2, in-sketch, in-r, in-a, or "folder"
    title: str  # the table's column: IN-Val, IN-v2, IN-v2 (threshold0.7), ...
    variant: str  # ImageNet-V2's test set, "" for the others
    folder: str
    images: int  # images scored (readable images of the common classes)
    classes: int  # classes scored: the folder's classes the model knows
    folder_classes: int  # classes in the folder
    predicted_among: int  # classes the predictions were made among
    skipped: int  # unreadable images left out
    top1: float | None  # percent; None when no image could be read
    top5: float | None
    skipped_examples: list[str] = field(default_factory=list)
    # ImageNet-R/-A for a model knowing more classes than it shares with them: the scores with the
    # other prediction set (all the model's classes if predicted_among is the shared ones, or back)
    other_among: int | None = None
    other_top1: float | None = None
    other_top5: float | None = None

    def coverage(self) -> str:
        """A line saying what was scored, when it is not simply the whole folder."""
        parts = []
        if self.classes < self.folder_classes:
            parts.append(f"{self.classes} of its {self.folder_classes} classes (those the model knows)")
        if self.skipped:
            parts.append(f"{self.skipped} unreadable image(s) skipped")
        return "; ".join(parts)


def load_classifier(path: str | Path, device: torch.device) -> Classifier:
    if not Path(path).is_file():
        raise UsageError(f"checkpoint {path} does not exist; give a .ckpt written by train.py")
    try:
        model = Classifier.load_from_checkpoint(str(path), map_location=device, weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} is not a streamgen classifier checkpoint ({type(e).__name__}: {e})") from None
    return model.eval()


def training_crop(checkpoint: str | Path) -> tuple[int | None, str]:
    """The crop the checkpoint was trained at (``train.crop`` in its run's config.yaml) and where it was read."""
    config = Path(checkpoint).resolve().parent.parent / "config.yaml"  # run_dir/checkpoints/x.ckpt
    try:
        crop = yaml.safe_load(config.read_text())["train"]["crop"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None, ""
    return (int(crop), str(config)) if isinstance(crop, int) and crop > 0 else (None, "")


def benchmark_transform(crop: int, resize: int | None = None) -> v2.Compose:
    """`streamgen.train.augment.eval_transform` with the resize made explicit (default ``crop / 0.875``)."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize or int(round(crop / CROP_RATIO)), antialias=True),
            v2.CenterCrop(crop),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@torch.no_grad()
def evaluate_benchmark(
    model: Classifier,
    benchmark: Benchmark,
    samples: list[tuple[str, int]],
    transform: v2.Compose,
    batch_size: int = 256,
    workers: int = 4,
    all_classes: bool = False,
) -> Result:
    """Top-1/top-5 on ``samples`` (the benchmark's images of the model's classes, model labels)."""
    n_classes = len(model.hparams.class_keys)
    present = sorted({label for _, label in samples})
    restrict = benchmark.predicts_among_its_classes and not all_classes
    both = benchmark.predicts_among_its_classes and len(present) < n_classes  # two prediction sets differ
    device = next(model.parameters()).device
    mask = torch.full((n_classes,), float("-inf"), device=device)
    mask[present] = 0.0
    loader = CountSkipped(
        DataLoader(
            ImageList(samples, transform),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=drop_unreadable,
            pin_memory=device.type == "cuda",
        ),
        benchmark.title,
    )
    hits = {"shared": [0, 0], "all": [0, 0]}
    total = 0
    for images, labels, _ in loader:
        if len(labels) == 0:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images).float()
        sets = {"shared": logits + mask, "all": logits} if both else {"shared" if restrict else "all": logits}
        for key, scores in sets.items():
            top1, top5 = topk_correct(scores, labels)
            hits[key][0] += int(top1)
            hits[key][1] += int(top5)
        total += len(labels)
    chosen, other = ("shared", "all") if restrict else ("all", "shared")
    hits1, hits5 = hits[chosen]

    def percent(count: int) -> float | None:
        return 100.0 * count / total if total else None

    return Result(
        dataset=benchmark.name,
        title=benchmark.title,
        variant=benchmark.variant,
        folder=str(benchmark.root),
        images=total,
        classes=len(present),
        folder_classes=len(benchmark.classes),
        predicted_among=len(present) if restrict else n_classes,
        skipped=loader.count,
        top1=percent(hits1),
        top5=percent(hits5),
        skipped_examples=loader.examples,
        other_among=(n_classes if restrict else len(present)) if both else None,
        other_top1=percent(hits[other][0]) if both else None,
        other_top5=percent(hits[other][1]) if both else None,
    )


def fmt(value: float | None, std: float | None = None) -> str:
    """A score as the tables print it: two decimals, '-' when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f} ± {std:.2f}" if std else f"{value:.2f}"


# -- the paper's tables -----------------------------------------------------------------------

TAB1_COLUMNS = ("IN-Val", "IN-v2", "IN-Sketch", "IN-R", "IN-A")


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def prediction_sets(r: Result) -> list[tuple[str, float | None]]:
    """A result's labelled top-1 columns: one, or for a subset model on ImageNet-R/-A two (predictions
    among the shared classes, then among all the model's), each saying how many classes it predicted among."""
    if r.other_among is None:
        return [(r.title, r.top1)]
    scores = {r.predicted_among: r.top1, r.other_among: r.other_top1}
    shared, every = sorted(scores)
    return [(f"{r.title} (among {shared} shared)", scores[shared]), (f"{r.title} (among all {every})", scores[every])]


def tab1_markdown(model_name: str, results: list[Result]) -> str:
    """Tab. 1: top-1 per benchmark, the paper's five columns first (``-`` where not evaluated); a subset
    model's ImageNet-R/-A get two columns, labelled (`prediction_sets`)."""
    by_title = {r.title: r for r in results}
    extra = [r.title for r in results if r.title not in TAB1_COLUMNS]
    header, row = ["Model"], [model_name]
    for title in (*TAB1_COLUMNS, *extra):
        columns = prediction_sets(by_title[title]) if title in by_title else [(title, None)]
        header += [label for label, _ in columns]
        row += [fmt(score) for _, score in columns]
    return _markdown(header, [row])


def tab2_markdown(model_name: str, probes: list[dict]) -> str:
    """Tab. 2: linear-probe top-1 per transfer dataset (mean ± std over seeds) and their average."""
    header = ["Model", *(p["dataset"] for p in probes), "Avg"]
    average = sum(p["top1"] for p in probes) / len(probes)
    row = [model_name, *(fmt(p["top1"], p.get("top1_std")) for p in probes), fmt(average)]
    return _markdown(header, [row])
