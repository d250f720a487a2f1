"""The trainer's side of the stream: one rank's queue as a Lightning data module.

Each batch is one queue slot (one unit of ``stream.batch_size`` sample ids), handed to
Lightning as zero-copy tensors over the slot. On a GPU, Lightning's device copy of the batch
is asynchronous (the slots are page-locked) and the slot is released once that copy is done;
on a CPU the slot is released once the batch is augmented into new memory.

The data module also keeps the stream's position: a `UnitCursor` of the units this rank has
handed to the model. It is saved in every checkpoint (all ranks' cursors, gathered) and
restored on resume, so a resumed run consumes every unit exactly once. Each consumed unit is
also appended to ``consumed-rank{r}.tsv`` in the run folder (step, unit): an audit trail.

The hand-off itself (augmentation, preview, audit file, validation loader) is
`streamgen.train.source.SourceDataModule`'s, shared with the cache; this module adds only where
batches come from (the queue) and when a slot may be reused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from streamgen.plan.samples import UnitCursor, rank_unit
from streamgen.stream.queue import SlotQueue
from streamgen.train.source import SourceDataModule

STATE_FORMAT = "streamgen-stream/1"


class QueueStream(IterableDataset):
    """Endless batches from one queue: ``{"image", "label", "id", "unit", "slot"}``.

    ``expected`` (called when iteration starts) gives the units in the order to consume them;
    without it, units are taken as they arrive. ``wait_seconds`` adds up the time spent
    blocked on the queue: the trainer's starvation, which the dashboard shows.
    """

    def __init__(self, queue: SlotQueue, expected: Callable[[], Iterator[int]] | None = None) -> None:
        self.queue, self.expected = queue, expected
        self.wait_seconds = 0.0
        self.stop_requested: Callable[[], bool] | None = None  # the run's stop word, read while waiting

    def __iter__(self):
        units = self.expected() if self.expected is not None else None
        yielded = False
        while True:
            started = time.perf_counter()
            try:
                slot = self.queue.get(unit=None if units is None else next(units), alive=self._check_stop)
            except _StopWaiting:
                # A stop was requested while waiting for data (no generator may deliver again).
                # Lightning holds the batch fetched before this one: ending here lets that step
                # run, on every rank, and the run stops and saves after it. With no batch yet,
                # nothing was trained and there is nothing to save.
                if yielded:
                    return
                raise StopRequested("stopped before the first step: nothing to save") from None
            self.wait_seconds += time.perf_counter() - started
            yielded = True
            view = self.queue.view(slot)
            yield {
                "image": view.images,
                "label": view.labels,
                "id": view.ids,
                "unit": self.queue.unit(slot),
                "slot": slot,
            }

    def _check_stop(self) -> None:
        if self.stop_requested is not None and self.stop_requested():
            raise _StopWaiting()


class _StopWaiting(Exception):
    pass


class StopRequested(RuntimeError):
    """A stop was requested before this rank trained a single step."""


class StreamDataModule(SourceDataModule):
    """One rank's queue as a source; the hand-off (augmentation, preview, audit) is the base's."""

    shares_memory = True  # on a CPU, batches are views of queue slots that generators reuse

    def __init__(
        self,
        queue: SlotQueue,
        rank: int,
        world: int,
        run_meta: dict[str, Any],
        crop: int,
        order: str = "increasing",
        stop_requested: Callable[[], bool] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(rank, world, run_meta, crop, **kw)
        self.queue, self.order, self.stop_requested = queue, order, stop_requested
        self.cursor = UnitCursor(rank, world)
        self.stream: QueueStream | None = None  # its wait_seconds: the trainer's starvation
        self._in_flight: list[tuple[int, torch.cuda.Event]] = []

    def _expected_units(self) -> Iterator[int]:
        """This rank's units not yet consumed, in increasing order (read when iteration starts,
        so after a resumed checkpoint has restored the cursor)."""
        return (rank_unit(self.rank, self.world, k) for k in self.cursor.pending())

    def setup(self, stage: str) -> None:
        # Page-lock the slots in this process too (registration is per process), so that
        # Lightning's non-blocking copy of each batch to the GPU really is asynchronous.
        if self.trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            self.queue.pin_memory()

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the queue already yields whole batches; no workers: the slots
        # live in this process's memory map.
        self.stream = QueueStream(self.queue, self._expected_units if self.order == "increasing" else None)
        self.stream.stop_requested = self.stop_requested
        return DataLoader(self.stream, batch_size=None, num_workers=0)

    def is_train_batch(self, batch: Any) -> bool:
        return isinstance(batch, dict) and "slot" in batch

    def _after_hand_off(self, batch: dict[str, Any], device: torch.device) -> None:
        self._release_when_copied(batch["slot"], device)

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

    def _mark_consumed(self, batch: dict[str, Any]) -> None:
        unit = batch["unit"]
        self.cursor.mark((unit - self.rank) // self.world)
        self._audit(f"{self.trainer.global_step}\t{unit}")

    def teardown(self, stage: str) -> None:
        for slot, event in self._in_flight:
            event.synchronize()
            self.queue.release(slot)
        self._in_flight = []
        super().teardown(stage)

    # -- the stream position in checkpoints ---------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        cursors = self.gather_positions(self.cursor.state_dict())
        return {"format": STATE_FORMAT, **self.run_meta, "cursors": cursors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = UnitCursor.from_state_dict(self.own_position(state["cursors"], "stream position"))


def stream_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The stream state saved in a Lightning checkpoint, or None if it has none."""
    state = checkpoint.get(StreamDataModule.__qualname__)
    if isinstance(state, dict) and state.get("format") == STATE_FORMAT:
        return state
    return None
