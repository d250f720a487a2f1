"""Real images on disk, for evaluation: one sub-folder per class key (the ImageNet-val layout).

Folder names are WordNet ids (or custom class names); they are mapped to the model's labels
by key, so a folder of any subset of the model's classes works, in any order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torchvision
from torch.utils.data import Dataset

from streamgen.errors import UsageError


def labelled_image_folder(
    root: str | Path,
    class_keys: list[str],
    transform: Callable | None = None,
    ignore_extra: bool = False,
) -> Dataset:
    """An ImageFolder whose targets are the model's labels for each folder's class key."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"image folder {root} does not exist")
    try:
        dataset = torchvision.datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"{root}: no images found in class sub-folders ({e})") from None
    label_of = {key: label for label, key in enumerate(class_keys)}
    unknown = [c for c in dataset.classes if c not in label_of]
    if unknown and not ignore_extra:
        raise UsageError(
            f"{root}: {len(unknown)} class folder(s) are not classes of the model, e.g. {unknown[0]} "
            "(evaluate on the model's classes only, or pass --ignore-extra-classes)"
        )
    folder_label = [label_of.get(c, -1) for c in dataset.classes]
    dataset.samples = [(path, folder_label[i]) for path, i in dataset.samples if folder_label[i] >= 0]
    dataset.targets = [label for _, label in dataset.samples]
    dataset.imgs = dataset.samples
    if not dataset.samples:
        raise UsageError(f"{root}: no images of the model's classes")
    return dataset
