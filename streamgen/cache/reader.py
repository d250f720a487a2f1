"""Reading a finished cache: memory-mapped shards, whole batches gathered by fancy indexing.

`CacheReader.gather(ids)` returns the images, labels and ids of any sample ids as whole
arrays: the ids are grouped by shard (vectorised) and each shard's rows are taken with one
``np.take`` over its memory map, straight into the output (page-locked on a CUDA machine, so
the trainer's device copy is asynchronous). No Python runs per image. Labels and ids (16 bytes
a sample) are held in memory.

`epoch_order(seed, epoch, n)` is the permutation of ``0..n-1`` for one epoch, a pure function of
(seed, epoch) computed with the plan's counter-based hash (no RNG state to save or replay).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from streamgen.cache.layout import CacheDamaged, Layout, check_shard_sizes, manifest_layout, read_manifest
from streamgen.plan.samples import hash_ids

_EPOCH_ORDER = 5  # a hash stream of its own, apart from the plan's (1..4)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Epoch ``epoch``'s order of the sample ids ``0..n-1``."""
    keys = hash_ids(_EPOCH_ORDER, seed, epoch, np.arange(n, dtype=np.int64))
    return np.argsort(keys, kind="stable")


def rank_batches(order: np.ndarray, rank: int, world: int, batch_size: int) -> np.ndarray:
    """Rank ``rank``'s batches of one epoch: positions ``p = rank (mod world)``, ``[batches, batch_size]``.

    Every rank gets the same number of batches, ``(n // world) // batch_size``; the few samples
    past that (fewer than ``world * batch_size``) are left out of this epoch (another order
    next epoch leaves out others)."""
    per_rank = (len(order) // world) // batch_size
    mine = order[rank::world][: per_rank * batch_size]
    return mine.reshape(per_rank, batch_size)


def steps_per_epoch(images: int, world: int, batch_size: int) -> int:
    return (images // world) // batch_size


class CacheReader:
    """Memory maps over every shard of a finished cache.

    Opening checks every shard's size (a truncated one is `CacheDamaged`, not an mmap error)
    and, given ``classes``, that every label is a class of the run (a flipped label byte would
    otherwise be an IndexError deep in the loss)."""

    def __init__(self, layout: Layout, pin: bool = False, classes: int | None = None) -> None:
        self.layout, self.pin = layout, pin
        lay = layout
        check_shard_sizes(lay)
        self._images: list[np.memmap] = []
        labels, ids = [], []
        for s in range(lay.shards):
            n, path = lay.shard_images(s), lay.shard_path(s)
            self._images.append(np.memmap(path, np.uint8, "r", 0, (n, 3, lay.resolution, lay.resolution)))
            labels.append(np.fromfile(path, np.int64, n, offset=n * lay.image_bytes))
            ids.append(np.fromfile(path, np.int64, n, offset=n * (lay.image_bytes + 8)))
        self.labels = np.concatenate(labels)
        self.ids = np.concatenate(ids)
        if classes is not None and len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= classes):
            shard = int(np.flatnonzero((self.labels < 0) | (self.labels >= classes))[0]) // lay.shard_size
            raise CacheDamaged(
                f"{lay.shard_path(shard)} holds a label outside 0..{classes - 1}: delete that shard and build "
                "again to remake it (python -m streamgen.cache build, same flags)"
            )

    @classmethod
    def open(cls, folder: str | Path, pin: bool = False, classes: int | None = None) -> CacheReader:
        manifest = read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"{folder} holds no finished cache (no manifest.json)")
        return cls(manifest_layout(folder, manifest), pin, classes)

    def __len__(self) -> int:
        return self.layout.images

    def gather(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 images ``[B, 3, R, R]``, labels and ids of the samples ``ids`` (in that order)."""
        ids = np.asarray(ids, dtype=np.int64)
        r = self.layout.resolution
        out = torch.empty((len(ids), 3, r, r), dtype=torch.uint8, pin_memory=self.pin)
        out_np = out.numpy()
        shards, rows = np.divmod(ids, self.layout.shard_size)
        order = np.argsort(shards, kind="stable")
        sorted_shards = shards[order]
        starts = np.flatnonzero(np.r_[True, sorted_shards[1:] != sorted_shards[:-1]])
        ends = np.r_[starts[1:], len(ids)]
        for start, end in zip(starts.tolist(), ends.tolist()):  # once per shard touched
            where = order[start:end]
            out_np[where] = self._images[int(sorted_shards[start])][rows[where]]
        return out, torch.from_numpy(self.labels[ids]), torch.from_numpy(self.ids[ids])
