"""The trainer's side of the stream: one rank's queue as a Lightning data module.

Each batch is one queue slot (one unit of ``stream.batch_size`` sample ids), handed to
Lightning as zero-copy tensors over the slot. On a GPU, Lightning's device copy of the batch
is asynchronous (the slots are page-locked) and the slot is released once that copy is done;
on a CPU the slot is released once the batch is augmented into new memory.

The data module also keeps the stream's position: a `UnitCursor` of the units this rank has
handed to the model. It is saved in every checkpoint (all ranks' cursors, gathered) and
restored on resume, so a resumed run consumes every unit exactly once. Each consumed unit is
also appended to ``consumed-rank{r}.tsv`` in the run folder (step, unit): an audit trail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from streamgen.augment import eval_transform, train_augment
from streamgen.plan import UnitCursor
from streamgen.queue import SlotQueue
from streamgen.realdata import labelled_image_folder

STATE_FORMAT = "streamgen-stream/1"


class QueueStream(IterableDataset):
    """Endless batches from one queue: ``{"image", "label", "id", "unit", "slot"}``."""

    def __init__(self, queue: SlotQueue) -> None:
        self.queue = queue

    def __iter__(self):
        while True:
            slot = self.queue.get()
            view = self.queue.view(slot)
            yield {
                "image": view.images,
                "label": view.labels,
                "id": view.ids,
                "unit": self.queue.unit(slot),
                "slot": slot,
            }


class StreamDataModule(L.LightningDataModule):
    def __init__(
        self,
        queue: SlotQueue,
        rank: int,
        world: int,
        run_meta: dict[str, Any],
        crop: int,
        min_scale: float = 0.08,
        class_keys: list[str] | None = None,
        val_dir: str | None = None,
        val_batch_size: int = 256,
        workers: int = 4,
        preview_every: int = 0,
        consumed_log: Path | None = None,
    ) -> None:
        super().__init__()
        self.queue, self.rank, self.world = queue, rank, world
        self.run_meta = run_meta  # what a checkpoint must match to be resumed: classes, seed, ...
        self.crop, self.min_scale = crop, min_scale
        self.class_keys, self.val_dir = class_keys or [], val_dir
        self.val_batch_size, self.workers = val_batch_size, workers
        self.preview_every = preview_every
        self.cursor = UnitCursor(rank, world)
        self.consumed_log = consumed_log
        self._log_file = None
        self._in_flight: list[tuple[int, torch.cuda.Event]] = []

    # -- loaders ----------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the queue already yields whole batches; no workers: the slots
        # live in this process's memory map.
        return DataLoader(QueueStream(self.queue), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_dir:
            return []
        dataset = labelled_image_folder(self.val_dir, self.class_keys, eval_transform(self.crop), ignore_extra=True)
        # Each rank scores its share (padded by at most world-1 repeated images).
        sampler = DistributedSampler(dataset, self.world, self.rank, shuffle=False) if self.world > 1 else None
        return DataLoader(
            dataset,
            batch_size=self.val_batch_size,
            sampler=sampler,
            num_workers=self.workers,
            pin_memory=torch.cuda.is_available(),
        )

    # -- the hand-off to the model ----------------------------------------------------------

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not (isinstance(batch, dict) and "slot" in batch):
            return batch  # a validation batch
        images, slot, unit = batch["image"], batch["slot"], batch["unit"]
        on_slot_memory = images.device.type == "cpu"  # no device copy was made
        out = {
            "image": train_augment(images, self.crop, self.min_scale),
            "label": batch["label"].clone() if on_slot_memory else batch["label"],
            "id": batch["id"].clone() if on_slot_memory else batch["id"],
            "unit": unit,
        }
        if self.preview_every and self.trainer.global_step % self.preview_every == 0:
            out["preview"] = images[:16].clone()
        self._release_when_copied(slot, images.device)
        self._mark_consumed(unit)
        return out

    def _release_when_copied(self, slot: int, device: torch.device) -> None:
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._in_flight.append((slot, event))
        else:
            self.queue.release(slot)
        still = []
        for s, e in self._in_flight:
            if e.query():
                self.queue.release(s)
            else:
                still.append((s, e))
        self._in_flight = still

    def _mark_consumed(self, unit: int) -> None:
        self.cursor.mark((unit - self.rank) // self.world)
        if self.consumed_log is not None:
            if self._log_file is None:
                self._log_file = open(self.consumed_log, "a", buffering=1)
            self._log_file.write(f"{self.trainer.global_step}\t{unit}\n")

    def teardown(self, stage: str) -> None:
        for slot, event in self._in_flight:
            event.synchronize()
            self.queue.release(slot)
        self._in_flight = []
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- the stream position in checkpoints ---------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        mine = self.cursor.state_dict()
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            cursors: list = [None] * self.world
            dist.all_gather_object(cursors, mine)  # called on every rank by Trainer.save_checkpoint
        else:
            cursors = [mine]
        return {"format": STATE_FORMAT, **self.run_meta, "cursors": cursors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = [c for c in state["cursors"] if c["rank"] == self.rank]
        if not mine:
            raise RuntimeError(f"the checkpoint holds no stream position for rank {self.rank}")
        self.cursor = UnitCursor.from_state_dict(mine[0])


def stream_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The stream state saved in a Lightning checkpoint, or None if it has none."""
    state = checkpoint.get(StreamDataModule.__qualname__)
    if isinstance(state, dict) and state.get("format") == STATE_FORMAT:
        return state
    return None
