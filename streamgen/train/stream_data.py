"""The trainer's side of the stream: one rank's queue as a Lightning data module.

Each batch is one queue slot (one unit of ``stream.batch_size`` sample ids), handed to
Lightning as zero-copy tensors over the slot. On a GPU, Lightning's device copy of the batch
is asynchronous (the slots are page-locked) and the slot is released once that copy is done;
on a CPU the slot is released once the batch is augmented into new memory.

With ``--stream.reuse K`` or ``auto`` (`ReplayDataModule`), units go into this rank's replay
buffer (`streamgen.train.replay`) instead, and every batch is composed from it: the queue only
says which steps bring a fresh unit (`ReplayStream`). ``reuse 1`` is the plain stream, untouched.

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
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from streamgen.plan.samples import UnitCursor, rank_unit
from streamgen.stream.queue import SlotQueue
from streamgen.train.checkpoint import atomic_save
from streamgen.train.replay import (
    STATE_FORMAT as REPLAY_FORMAT,
)
from streamgen.train.replay import (
    UNLIMITED,
    AutoSchedule,
    ReplayBuffer,
    ReplaySettings,
    ReuseSchedule,
    audit_line,
)
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
            slot = self._wait_for(None if units is None else next(units), yielded)
            if slot is None:
                return
            yielded = True
            yield self._slot_batch(slot)

    def _wait_for(self, unit: int | None, yielded: bool) -> int | None:
        """The slot of ``unit`` (or the next to arrive), waiting; None when a stop ends the stream."""
        started = time.perf_counter()
        try:
            slot = self.queue.get(unit=unit, alive=self._check_stop)
        except _StopWaiting:
            # A stop was requested while waiting for data (no generator may deliver again).
            # Lightning holds the batch fetched before this one: ending here lets that step
            # run, on every rank, and the run stops and saves after it. With no batch yet,
            # nothing was trained and there is nothing to save.
            if yielded:
                return None
            raise StopRequested("stopped before the first step: nothing to save") from None
        self.wait_seconds += time.perf_counter() - started
        return slot

    def _slot_batch(self, slot: int) -> dict[str, Any]:
        view = self.queue.view(slot)
        return {"image": view.images, "label": view.labels, "id": view.ids, "unit": self.queue.unit(slot), "slot": slot}

    def _check_stop(self) -> None:
        if self.stop_requested is not None and self.stop_requested():
            raise _StopWaiting()


NO_UNIT = -1  # a ReplayStream item that brings no fresh unit: the step trains on the buffer


class ReplayStream(QueueStream):
    """Which steps bring a fresh unit: ``{"slot": s, ...}`` as `QueueStream`, or ``{"slot": NO_UNIT}``.

    The batch itself is composed by the data module at hand-off, from its buffer (Lightning
    fetches one batch ahead, so the buffer is only touched when a step really runs).
    ``start()`` (called when iteration starts, after a resumed checkpoint is restored) gives
    the first step and whether the buffer already holds a batch to replay.

    - reuse K (``needs_unit`` given): step t waits for a unit exactly when the schedule takes
      samples of one not yet arrived; it never polls ahead, so timing cannot change a batch.
    - auto (``needs_unit`` None): a unit when one is ready, else none as soon as the buffer
      holds something: the trainer never waits on a non-empty buffer.
    """

    def __init__(
        self,
        queue: SlotQueue,
        expected: Callable[[], Iterator[int]] | None,
        start: Callable[[], tuple[int, bool]],
        needs_unit: Callable[[int], bool] | None = None,
    ) -> None:
        super().__init__(queue, expected)
        self.start, self.needs_unit = start, needs_unit

    def __iter__(self):
        units = self.expected() if self.expected is not None else None
        step, buffered = self.start()
        yielded = False
        want = next(units) if units is not None else None
        while True:
            if self.needs_unit is not None:
                slot = self._wait_for(want, yielded) if self.needs_unit(step) else NO_UNIT
            else:
                slot = self.queue.try_get(unit=want) if buffered else None
                if slot is None:
                    slot = NO_UNIT if buffered else self._wait_for(want, yielded)
            if slot is None:
                return  # a stop ended the wait
            if slot == NO_UNIT:
                yield {"slot": NO_UNIT, "unit": NO_UNIT}
            else:
                yield self._slot_batch(slot)
                buffered = True  # the unit is in the buffer by the time the next item is used
                want = next(units) if units is not None else None
            yielded = True
            step += 1


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


class ReplayDataModule(StreamDataModule):
    """One rank's queue through a replay buffer (``--stream.reuse K`` or ``auto``).

    Every unit that arrives enters the buffer; every batch is drawn from it by the schedule
    (`streamgen.train.replay`), composed at hand-off on the buffer's device. The audit line of
    a step is (step, unit arrived or ``-``, fresh ids, replayed ids). The buffer and the draw
    state go into a sidecar per rank, ``checkpoints/replay/step{S}-rank{r}.pt``, written
    atomically whenever a checkpoint is (the ``.ckpt`` names it, and stays small).
    """

    shares_memory = False  # batches are gathered from the buffer into new memory

    def __init__(self, queue: SlotQueue, replay: ReplaySettings, sidecar_dir: Path, **kw: Any) -> None:
        super().__init__(queue, **kw)
        self.replay, self.sidecar_dir = replay, Path(sidecar_dir)
        batch = queue.unit_size
        if replay.reuse is None:
            self.schedule: ReuseSchedule | AutoSchedule = AutoSchedule(batch, replay.seed, self.rank)
        else:
            self.schedule = ReuseSchedule(
                batch, replay.reuse, replay.max_steps, replay.capacity, replay.seed, self.rank
            )
        self.buffer: ReplayBuffer | None = None  # made in setup, on the trainer's device
        self.fresh_images = 0  # this rank's samples trained on fresh: unique images (ComputeMonitor)
        self._restore: dict[str, Any] | None = None
        self._saved_step = -1

    # -- the buffer ----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)
        device = self._trainer_device() if self.replay.on_device and self.trainer is not None else "cpu"
        self.buffer = ReplayBuffer(self.replay.capacity, self.queue.resolution, device)
        self._apply_restore()

    def _start(self) -> tuple[int, bool]:
        return self.trainer.global_step, self.buffer is not None and len(self.buffer) >= self.queue.unit_size

    def train_dataloader(self) -> DataLoader:
        needs = self.schedule.needs_unit if isinstance(self.schedule, ReuseSchedule) else None
        expected = self._expected_units if self.order == "increasing" else None
        self.stream = ReplayStream(self.queue, expected, self._start, needs)
        self.stream.stop_requested = self.stop_requested
        return DataLoader(self.stream, batch_size=None, num_workers=0)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if self.is_train_batch(batch) and self.buffer is not None and self.buffer.device != device:
            return batch  # a buffer in host memory: the unit is copied into it from the slot
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.is_train_batch(batch):
            return batch  # a validation batch
        step, unit = self.trainer.global_step, None
        if batch["slot"] != NO_UNIT:
            unit = batch["unit"]
            uses = UNLIMITED if self.replay.reuse is None else self.replay.reuse
            self.buffer.add(batch["image"], batch["label"], batch["id"], uses, evict=self.replay.reuse is None)
            self._release_when_copied(batch["slot"], batch["image"].device)
            self.cursor.mark((unit - self.rank) // self.world)
        if isinstance(self.schedule, AutoSchedule):
            draw = self.schedule.draw(self.buffer, step, fresh_unit=unit is not None)
        else:
            draw = self.schedule.draw(self.buffer, step)
        taken = self.buffer.take(draw.slots)
        self.fresh_images += draw.fresh
        self._audit(audit_line(step, unit, taken["id"][: draw.fresh], taken["id"][draw.fresh :]))
        device = self._trainer_device()
        composed = {
            "image": taken["image"].to(device, non_blocking=True),
            "label": taken["label"].to(device, non_blocking=True),
            "id": taken["id"].to(device, non_blocking=True),
            "fresh": draw.fresh,
        }
        return self._hand_off(composed)

    def _trainer_device(self) -> torch.device:
        strategy = getattr(self.trainer, "strategy", None)
        return strategy.root_device if strategy is not None else torch.device("cpu")

    def _after_hand_off(self, batch: dict[str, Any], device: torch.device) -> None:
        pass  # the slot was released once copied into the buffer

    def _mark_consumed(self, batch: dict[str, Any]) -> None:
        pass  # units are marked on arrival, the audit line is written once the batch is drawn

    # -- the sidecar -----------------------------------------------------------------------------

    def sidecar_path(self, step: int, folder: Path | None = None) -> Path:
        return (folder or self.sidecar_dir) / f"step{step}-rank{self.rank}.pt"

    def _save_sidecar(self) -> dict[str, Any]:
        step = self.trainer.global_step
        name = self.sidecar_path(step).name
        if step != self._saved_step:  # last.ckpt is saved at the same step as the periodic one
            self.sidecar_dir.mkdir(parents=True, exist_ok=True)
            state = {
                "format": REPLAY_FORMAT,
                "reuse": self.replay.label,
                "step": step,
                "fresh_images": self.fresh_images,
                "buffer": self.buffer.state_dict(),
            }
            atomic_save(state, self.sidecar_dir / name)
            self._saved_step = step
            self._prune_sidecars()
        return {
            "reuse": self.replay.label,
            "buffer": self.replay.capacity,
            "max_steps": self.replay.max_steps,
            "step": step,
            "sidecar": name,
            "fresh_images": self.fresh_images,
        }

    def _prune_sidecars(self) -> None:
        """Keep the sidecars of the most recent steps (as many as the checkpoints kept, and last.ckpt's)."""
        mine = []
        for path in self.sidecar_dir.glob(f"step*-rank{self.rank}.pt"):
            try:
                mine.append((int(path.name[4:].split("-", 1)[0]), path))
            except ValueError:
                continue
        for _, path in sorted(mine)[: -(self.replay.keep + 1)]:
            path.unlink(missing_ok=True)

    def _apply_restore(self) -> None:
        if self._restore is None or self.buffer is None:
            return
        info, self._restore = self._restore, None
        folder = Path(self.replay.resume_dir) / "replay" if self.replay.resume_dir else self.sidecar_dir
        path = folder / info["sidecar"]
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != REPLAY_FORMAT or state.get("reuse") != self.replay.label:
            raise RuntimeError(f"{path}: not the replay sidecar of a run with --stream.reuse {self.replay.label}")
        self.buffer.load_state_dict(state["buffer"])
        self.fresh_images = int(state["fresh_images"])

    def state_dict(self) -> dict[str, Any]:
        mine = {**self.cursor.state_dict(), "replay": self._save_sidecar()}
        return {"format": STATE_FORMAT, **self.run_meta, "cursors": self.gather_positions(mine)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = self.own_position(state["cursors"], "stream position")
        self.cursor = UnitCursor.from_state_dict(own)
        if "replay" not in own:
            raise RuntimeError("the checkpoint holds no replay buffer (a run with --stream.reuse 1)")
        self._restore = own["replay"]
        self._apply_restore()


def stream_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The stream state saved in a Lightning checkpoint, or None if it has none."""
    for owner in (StreamDataModule, ReplayDataModule):  # Lightning keys the state by the class's name
        state = checkpoint.get(owner.__qualname__)
        if isinstance(state, dict) and state.get("format") == STATE_FORMAT:
            return state
    return None
