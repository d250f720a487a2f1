"""Training from the fixed cache: epochs over its N samples, as a Lightning data module.

Epoch e visits the samples in the order `epoch_order(seed, e)` (a pure function of the run seed
and the epoch); rank r of T takes the positions ``p = r (mod T)`` of that order in batches of
``stream.batch_size``, so every epoch each sample is read by exactly one rank, once. Every rank
gets ``(N // T) // batch_size`` batches an epoch (the same count, as DDP needs); the fewer than
``T * batch_size`` samples past that are left out of that epoch only.

To Lightning the cache is one endless epoch, like the stream: ``train.max_steps`` (or
``train.epochs``, which sets it) ends the run. The position is (epoch, batches handed to the
model in it), saved in every checkpoint for every rank and restored on resume, so a resumed
run continues the same epoch at the same batch. Each batch handed over is appended to
``consumed-rank{r}.tsv``: step, epoch, batch, and the batch's sample ids (comma-separated).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from streamgen.cache.layout import Layout
from streamgen.cache.reader import CacheReader, epoch_order, rank_batches, steps_per_epoch
from streamgen.stream.queue import OwnerDied
from streamgen.train.source import SourceDataModule

STATE_FORMAT = "streamgen-cache/1"


class CacheBatches(IterableDataset):
    """Endless batches ``{"image", "label", "id", "epoch", "batch"}`` from one rank's share,
    starting at the data module's position when iteration starts (after a resume restored it).

    A thread gathers up to ``prefetch`` batches ahead (page faults and copies release the GIL),
    so reading a cache larger than the page cache overlaps the model's step."""

    def __init__(self, data: CacheDataModule, prefetch: int = 2) -> None:
        self.data, self.prefetch = data, prefetch
        self.wait_seconds = 0.0  # time the trainer spent waiting for the reader: its starvation

    def _batches(self, epoch: int, first: int):
        """(epoch, batch index, sample ids) from the position on, epoch after epoch."""
        while True:
            for b, ids in enumerate(self.data.epoch_batches(epoch)[first:], start=first):
                yield epoch, b, ids
            epoch, first = epoch + 1, 0

    def __iter__(self):
        data = self.data
        reader = data.reader()
        owner = os.getppid()  # the launcher: a rank must not outlive it
        ahead: queue.Queue = queue.Queue(maxsize=max(self.prefetch, 1))
        stop = threading.Event()

        def gather() -> None:
            try:
                for epoch, b, ids in self._batches(data.epoch, data.batches):
                    item = (epoch, b, *reader.gather(ids))
                    while not stop.is_set():
                        try:
                            ahead.put(item, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as e:  # handed to the consumer, which raises it
                ahead.put(e)

        thread = threading.Thread(target=gather, name="cache-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                started = time.perf_counter()
                try:
                    item = ahead.get(timeout=1.0)
                except queue.Empty:
                    item = None
                self.wait_seconds += time.perf_counter() - started
                if os.getppid() != owner:
                    raise OwnerDied(f"the launcher (pid {owner}) that owns the run has exited")
                if item is None:
                    continue
                if isinstance(item, BaseException):
                    raise item
                epoch, b, images, labels, ids = item
                yield {"image": images, "label": labels, "id": ids, "epoch": epoch, "batch": b}
        finally:
            stop.set()


class CacheDataModule(SourceDataModule):
    """A rank's share of each epoch over the cache; the hand-off is the base's (`SourceDataModule`)."""

    def __init__(
        self,
        layout: Layout,
        seed: int,
        batch_size: int,
        rank: int,
        world: int,
        run_meta: dict[str, Any],
        crop: int,
        pin: bool = False,
        classes: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(rank, world, run_meta, crop, **kw)
        self.layout, self.seed, self.batch_size, self.pin = layout, seed, batch_size, pin
        self.classes = classes  # labels range-checked when the shards are opened
        self.steps_per_epoch = steps_per_epoch(layout.images, world, batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"a cache of {layout.images} images has no batch of {batch_size} for each of {world} ranks"
            )
        self.epoch, self.batches = 0, 0  # the next batch to hand to the model
        self._reader: CacheReader | None = None

    def reader(self) -> CacheReader:
        if self._reader is None:
            self._reader = CacheReader(self.layout, pin=self.pin, classes=self.classes)
        return self._reader

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """This rank's batches of sample ids in ``epoch``: ``[steps_per_epoch, batch_size]``."""
        return rank_batches(epoch_order(self.seed, epoch, self.layout.images), self.rank, self.world, self.batch_size)

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: whole batches are gathered at once; no workers: the memory maps are
        # read in this process (the page cache is shared anyway).
        self.stream = CacheBatches(self)  # its wait_seconds: the trainer's wait fraction, as the stream's
        return DataLoader(self.stream, batch_size=None, num_workers=0)

    def _mark_consumed(self, batch: dict[str, Any]) -> None:
        epoch, b = int(batch["epoch"]), int(batch["batch"])
        if (epoch, b) != (self.epoch, self.batches):
            raise RuntimeError(
                f"rank {self.rank}: cache batch (epoch {epoch}, batch {b}) handed over out of turn "
                f"(expected epoch {self.epoch}, batch {self.batches})"
            )
        self.batches += 1
        if self.batches == self.steps_per_epoch:
            self.epoch, self.batches = self.epoch + 1, 0
        ids = ",".join(map(str, batch["id"].tolist()))
        self._audit(f"{self.trainer.global_step}\t{epoch}\t{b}\t{ids}")

    # -- the cache position in checkpoints ----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        positions = self.gather_positions({"rank": self.rank, "epoch": self.epoch, "batches": self.batches})
        return {"format": STATE_FORMAT, **self.run_meta, "positions": positions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.own_position(state["positions"], "cache position")
        self.epoch, self.batches = int(mine["epoch"]), int(mine["batches"])


def cache_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The cache position saved in a Lightning checkpoint, or None if it has none."""
    state = checkpoint.get(CacheDataModule.__qualname__)
    if isinstance(state, dict) and state.get("format") == STATE_FORMAT:
        return state
    return None


def consumed_ids(path: Path) -> list[tuple[int, int, int, list[int]]]:
    """The audit trail of a cache run: (step, epoch, batch, sample ids) per consumed batch."""
    rows = []
    for line in Path(path).read_text().splitlines():
        step, epoch, b, ids = line.split("\t")
        rows.append((int(step), int(epoch), int(b), [int(i) for i in ids.split(",")]))
    return rows
