"""Trainer liveness: each rank's last sign of progress in shared memory, and the launcher's watch.

A rank shows progress by stepping (a Lightning ``LambdaCallback`` beats at every training and
validation batch and checkpoint: `Pulse.hooks`) and, while it waits for data on its queue, by
beating from the wait loop about once a second: waiting for generators is not a hang (their
own watchdog is in the supervisor). A rank that is stopped (SIGSTOP; a wedged CUDA context or a
process stuck in the kernel behaves alike) or stuck inside a step beats no more. Work inside a
step that takes long without a batch hook (a linear probe, a slow checkpoint) must fit in the
timeout.

The launcher's `TrainerWatch` reads the beats. The run is stalled when no rank has beaten for
``timeout`` seconds: DDP ranks step in lockstep, so one stuck rank soon leaves the others waiting
in a collective, beating no more either; while any rank beats, the others may be waiting for it.
The rank named is the one stuck outside a collective when that can be told (one that was waiting
for data when it stopped beating), else the one whose last beat is the oldest.

Times are `time.monotonic()`: CLOCK_MONOTONIC on Linux, one clock for all processes of a machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from streamgen.stream.queue import SharedBuffer

_TIME, _WAITING = range(2)  # columns: monotonic time of the last beat, 1 if it was waiting for data


class Heartbeats:
    """One row per trainer rank in shared memory, written by that rank only; handed to the
    trainer processes when they are spawned (like the queues)."""

    def __init__(self, ranks: int) -> None:
        self.ranks = ranks
        self.buffer = SharedBuffer(8 * 2 * ranks, "streamgen-heartbeat")
        self._attach()

    def _attach(self) -> None:
        self.table = self.buffer.array(np.float64, (self.ranks, 2), 0)

    def __getstate__(self) -> dict:
        return {"ranks": self.ranks, "buffer": self.buffer}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._attach()

    def beat(self, rank: int, waiting: bool = False) -> None:
        """Rank ``rank`` made progress now: it stepped, or (``waiting``) it waits for data."""
        self.table[rank, _WAITING] = float(waiting)
        self.table[rank, _TIME] = time.monotonic()

    def last(self, rank: int) -> tuple[float | None, bool]:
        """(time of its last beat or None if it never beat, whether it was waiting for data)."""
        t, waiting = self.table[rank]
        return (float(t) if t > 0 else None), bool(waiting)

    def close(self) -> None:
        self.buffer.close()

    def pulse(self, rank: int) -> Pulse:
        """The row of one rank, for that rank's process."""
        return Pulse(self, rank)


# Lightning hooks at which a rank beats: every training and validation batch, and checkpoints.
BEAT_HOOKS = (
    "on_train_start",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_save_checkpoint",
)


class Pulse:
    """One rank's heartbeat: what a trainer process holds (picklable at spawn)."""

    def __init__(self, beats: Heartbeats, rank: int) -> None:
        self.beats, self.rank = beats, rank

    def beat(self, waiting: bool = False) -> None:
        self.beats.beat(self.rank, waiting)

    def hooks(self) -> dict[str, Callable[..., None]]:
        """Arguments of Lightning's ``LambdaCallback`` that beat at each of `BEAT_HOOKS`."""
        return dict.fromkeys(BEAT_HOOKS, self._on_hook)

    def _on_hook(self, *args, **kwargs) -> None:
        self.beat()


class TrainerWatch:
    """The launcher's side: which rank, if any, has stalled the run (see the module docstring).

    A rank that has not beaten yet is starting (imports, DDP set-up, model, a resumed
    checkpoint): it gets ``max(timeout, startup)`` from the watch's creation. Rows are this
    node's ranks; ``first_rank`` is the global rank of row 0, for messages.
    """

    def __init__(
        self,
        beats: Heartbeats,
        timeout: float,
        startup: float,
        first_rank: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.beats, self.timeout, self.startup, self.clock = beats, timeout, startup, clock
        self.first_rank = first_rank
        self.created = clock()

    def check(self) -> None:
        """Raise `TrainerStalled` naming the stalled rank; return while the run progresses."""
        now = self.clock()
        stale: list[tuple[int, float, bool]] = []  # (row, seconds since its last sign, waiting)
        for row in range(self.beats.ranks):
            last, waiting = self.beats.last(row)
            limit = self.timeout if last is not None else max(self.timeout, self.startup)
            age = now - (last if last is not None else self.created)
            if age <= limit:
                return  # it progresses; the others may be waiting for it in a collective
            stale.append((row, age, waiting))
        row, age, waiting = max(stale, key=lambda s: (s[2], s[1]))  # waiting for data first, then oldest
        doing = "it was waiting for data" if waiting else "no step, no validation batch, no checkpoint"
        raise TrainerStalled(
            row,
            f"trainer rank {self.first_rank + row} made no progress for {age:.0f} s ({doing}; "
            f"--train.hang_timeout {self.timeout:g}): it is stopped or stuck",
        )


class TrainerStalled(RuntimeError):
    """A trainer rank made no progress for too long; ``row`` is its index on this node."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row
