"""Real images on disk, for evaluation and validation, where a bad file is skipped, not fatal.

A benchmark folder (`streamgen.evaluate.benchmarks`) is mapped to the model's labels by class key, so a
folder of any subset of the model's classes works, and a full benchmark evaluated with a model
trained on some of its classes scores the classes the two have in common.

An image that cannot be decoded (corrupt, truncated, not an image) does not end the run:
`ImageList` returns an `Unreadable` marker in its place, the collate function
`drop_unreadable` leaves it out of the batch and passes it along as a third element, and
`CountSkipped` (iterating in the main process, whatever the loader's workers) counts them and
names the first few on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision.datasets.folder import pil_loader

from streamgen.evaluate.benchmarks import check_folder

SHOW_SKIPPED = 5  # unreadable images named in the log; the rest are only counted


@dataclass(frozen=True)
class Unreadable:
    """Stands in for an image that could not be decoded."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


class ImageList(Dataset):
    """``(image, label)`` for each ``(path, label)``, or an `Unreadable` where decoding fails."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None = None) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = pil_loader(path)  # decodes fully: a truncated file fails here, not in the transform
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            return Unreadable(path, f"{type(e).__name__}: {e}")
        return (self.transform(image) if self.transform else image), label


def drop_unreadable(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Collate the readable samples: ``(images, labels, skipped)``, where skipped names each unreadable
    image and its error (plain strings: Lightning moves batches with a function that rejects frozen
    dataclasses); images and labels are empty if none was readable."""
    good = [sample for sample in batch if not isinstance(sample, Unreadable)]
    skipped = [str(sample) for sample in batch if isinstance(sample, Unreadable)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, labels = default_collate(good)
    return images, labels, skipped


class CountSkipped:
    """Iterates a loader collated by `drop_unreadable` in the main process, counting what it skipped.

    The first `SHOW_SKIPPED` unreadable images are named on stderr; all are counted in ``count``
    (over every pass) and the first few kept in ``examples``. Batches pass through unchanged.
    """

    def __init__(self, loader: Iterable, what: str) -> None:
        self.loader, self.what = loader, what
        self.count, self.examples = 0, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            self.add(batch[2])
            yield batch

    def add(self, skipped: list[str]) -> None:
        for item in skipped:
            self.count += 1
            if len(self.examples) < SHOW_SKIPPED:
                self.examples.append(item)
                print(f"streamgen: {self.what}: skipped an unreadable image: {item}", file=sys.stderr, flush=True)


def labelled_image_folder(
    root: str | Path,
    class_keys: list[str],
    transform: Callable | None = None,
    ignore_extra: bool = True,
    flag: str = "--data",
) -> ImageList:
    """The images of ``root`` of the model's classes, labelled as the model labels them.

    Classes the model does not know are always left out (``ignore_extra`` is kept for old callers).
    """
    _, samples = check_folder(root, class_keys, flag)
    return ImageList(samples, transform)


def val_loader(
    root: str,
    class_keys: list[str],
    transform: Callable,
    batch_size: int,
    workers: int,
    rank: int = 0,
    world: int = 1,
) -> CountSkipped:
    """The validation loader of training: each rank scores its share; unreadable images are skipped."""
    dataset = labelled_image_folder(root, class_keys, transform, flag="--train.val_dir")
    # Each rank scores its share (padded by at most world-1 repeated images).
    sampler = DistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=drop_unreadable,
        pin_memory=torch.cuda.is_available(),
    )
    return CountSkipped(loader, f"val_dir (rank {rank})" if world > 1 else "val_dir")
