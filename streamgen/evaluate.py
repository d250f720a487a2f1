"""Evaluation of a trained checkpoint on folders of real images (the paper's tables).

Each folder has one sub-folder per class key (WordNet id), like the ImageNet validation set;
ImageNet-V2, -Sketch, -R and -A are laid out the same way. Images get the standard ImageNet
evaluation transform (resize to crop/0.875, centre crop). When a folder holds only some of the
model's classes (ImageNet-R and -A hold 200), predictions are made among those classes only,
as those benchmarks prescribe; ``mask_absent=False`` scores among all the model's classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from streamgen.augment import eval_transform
from streamgen.errors import UsageError
from streamgen.model import Classifier, topk_correct
from streamgen.realdata import labelled_image_folder


@dataclass(frozen=True)
class Result:
    folder: str
    images: int
    classes: int
    top1: float
    top5: float


def load_classifier(path: str | Path, device: torch.device) -> Classifier:
    if not Path(path).is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        model = Classifier.load_from_checkpoint(str(path), map_location=device, weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} is not a streamgen classifier checkpoint ({type(e).__name__}: {e})") from None
    return model.eval()


@torch.no_grad()
def evaluate_folder(
    model: Classifier,
    root: str | Path,
    crop: int = 224,
    batch_size: int = 256,
    workers: int = 4,
    mask_absent: bool = True,
    ignore_extra: bool = False,
) -> Result:
    keys = list(model.hparams.class_keys)
    dataset = labelled_image_folder(root, keys, eval_transform(crop), ignore_extra=ignore_extra)
    present = sorted(set(dataset.targets))
    device = next(model.parameters()).device
    mask = torch.full((len(keys),), float("-inf"), device=device)
    mask[present] = 0.0
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    hits1 = hits5 = total = 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images).float()
        if mask_absent:
            logits = logits + mask
        top1, top5 = topk_correct(logits, labels)
        hits1, hits5, total = hits1 + int(top1), hits5 + int(top5), total + len(labels)
    return Result(str(root), total, len(present), 100.0 * hits1 / total, 100.0 * hits5 / total)
