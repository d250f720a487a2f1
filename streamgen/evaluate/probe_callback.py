"""Linear probes while training: the Tab. 2 protocol on transfer datasets every N steps.

``--train.probes NAME=ROOT[,NAME=ROOT]`` and ``--train.probe_every N``: after every N-th step
each probe extracts the backbone's features of its train and test splits (`streamgen.evaluate.probe`),
fits the logistic-regression probe and logs, at the global step, ``probe/<NAME>/top1`` (test
top-1, percent), ``probe/<NAME>/C`` (the chosen regularisation) and ``probe/seconds`` (the
whole evaluation's wall time) through the trainer's loggers, like every other scalar, so they
can be plotted against steps or compute. ``--train.probe_subset K`` keeps at most K images per
class of each split (the same ones every time) for quicker probes.

Under DDP every rank extracts the features of its share of the images (every world-th image)
and the shares are all-gathered (one collective per split, entered by every rank at the same
step), then every rank fits the same probe on the same features: no rank waits for another in
a barrier while it fits, so a long fit never meets the collective timeout; rank 0 logs. The
loggers are called outside any collective (Lightning issues #19045, #19783).

The stream is not touched: the probe runs between two training steps, the data module has
handed out nothing meanwhile, and the generators block on the full queue until training goes
on (a generator idle on a full queue owes the supervisor nothing). No sample is lost or
repeated: ``consumed-rank{r}.tsv`` is the proof the tests read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from streamgen.evaluate.probe import (
    dataset_targets,
    extract_features,
    per_class_subset,
    probe_features,
    probe_transform,
)
from streamgen.evaluate.transfer import TransferSplits, load_transfer
from streamgen.train.compute import ScoresWhileTraining


class LinearProbe(ScoresWhileTraining):
    def __init__(
        self,
        probes: list[tuple[str, str]],
        every: int,
        crop: int = 224,
        subset: int | None = None,
        batch_size: int = 256,
        workers: int = 4,
        beat: Callable[[], None] | None = None,
    ) -> None:
        self.probes, self.every, self.crop, self.subset = probes, every, crop, subset
        self.batch_size = batch_size
        self.workers = min(workers, os.cpu_count() or 1)
        self.beat = beat or (lambda: None)  # the trainer's liveness beat, if it has one: a probe is progress
        self._splits: dict[str, tuple[Dataset, Dataset]] = {}
        super().__init__()  # self.last: name -> summary of the latest probe (logged by cost)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Read every layout once (they were checked before the run started).
        for name, root in self.probes:
            self._splits[name] = self._subsets(load_transfer(name, root, probe_transform(self.crop)))

    def _subsets(self, splits: TransferSplits) -> tuple[Dataset, Dataset]:
        if not self.subset:
            return splits.train, splits.test
        return tuple(Subset(s, per_class_subset(s.targets, self.subset)) for s in (splits.train, splits.test))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every:
            return
        start = time.monotonic()
        metrics: dict[str, float] = {}
        for name, _ in self.probes:
            train, test = self._splits[name]
            x_train, x_test = self._features(trainer, pl_module, train), self._features(trainer, pl_module, test)
            results = probe_features(
                x_train, dataset_targets(train), x_test, dataset_targets(test), seeds=1, on_eval=self.beat
            )
            self.last[name] = {"top1": results[0].top1, "C": results[0].C, "step": step}
            metrics[f"probe/{name}/top1"] = results[0].top1
            metrics[f"probe/{name}/C"] = results[0].C
        metrics["probe/seconds"] = time.monotonic() - start
        if trainer.is_global_zero:  # plain logger calls, outside any collective
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _features(self, trainer: L.Trainer, pl_module: L.LightningModule, dataset: Dataset) -> torch.Tensor:
        """Every image's features on every rank: each rank extracts every world-th image, then all-gather."""
        rank, world = trainer.global_rank, trainer.world_size
        mine = list(range(rank, len(dataset), world))
        # A rank with no image (more ranks than images) still needs the feature width: it extracts one.
        features = extract_features(
            pl_module, Subset(dataset, mine or [0]), self.batch_size, self.workers, on_batch=self.beat
        )
        features = features[: len(mine)]
        if world == 1 or not (dist.is_available() and dist.is_initialized()):
            return features
        # Shares differ by at most one image: pad to the largest, gather, interleave back.
        padded = features.new_zeros(-(-len(dataset) // world), features.shape[1])
        padded[: len(features)] = features
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        return interleave(gathered, len(dataset))


def interleave(shares: list[torch.Tensor], n: int) -> torch.Tensor:
    """Rows in dataset order from each rank's padded share (rank r holds images r, r + world, ...)."""
    world = len(shares)
    out = shares[0].new_empty(n, *shares[0].shape[1:])
    for r, share in enumerate(shares):
        out[r::world] = share[: len(range(r, n, world))]
    return out
