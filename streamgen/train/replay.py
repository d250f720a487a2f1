"""The replay buffer: a trainer rank that reuses the samples it has already seen.

A generator GPU makes a few images per second, a trainer GPU consumes thousands: with
``--stream.reuse K`` or ``auto`` each rank keeps the samples it has trained on in a
`ReplayBuffer` (uint8 images, labels, ids, uses so far, uses left) and trains on them again.
The stream's promises still hold (docs/stream.md, "Replay"):

- **fresh exactly once**: every id arrives fresh at one rank, once; replay only adds further
  uses of ids that have already arrived (the audit trail tells, per step, which were which);
- **deterministic reuse K** (`ReuseSchedule`): every sample is trained on exactly K times over a
  finished run (once fresh, K-1 times replayed). Which samples a step uses is decided by the
  buffer's content and a generator seeded from (run seed, rank, step), and the content depends
  only on the order units arrived in: with ``--stream.order increasing`` two runs of one config
  train on the same samples at the same steps, whatever the generators' timing;
- **staleness bound**: a sample leaves the buffer after its uses, or (``auto`` only; K never
  needs it) oldest first when the buffer is full;
- **resume**: the buffer and the step are the replay's whole state (`ReplayBuffer.state_dict`).

The schedule of reuse K over a run of S steps of B samples (``ReuseSchedule``), in three phases:

1. *ramp*: the first ``m`` steps are all fresh (there is nothing to replay yet);
2. *steady*: each step takes about B/K fresh samples (cumulative ``ceil``: never fewer than
   B/K on average) and fills the rest with samples drawn uniformly from those with uses left;
3. *drain*: the last ``m (K-1)`` steps take no fresh sample and use up every use left, the
   samples with the most uses left first (ties broken at random).

Every fresh sample brings K-1 replays and every steady step spends B - B/K of them, so the
uses left in the buffer stay at ``m B (K-1)`` through the steady phase: exactly what the drain
spends, with at most K-1 per sample over at least K-1 steps, so every sample is used exactly K
times (this needs ``S B`` divisible by K, which the launcher checks). The buffer never holds
more than ``m B (K-1) + K`` samples with uses left plus the unit being taken fresh, so ``m``
is the largest ramp that fits the capacity (`ramp_steps`): a larger buffer mixes batches
better (fewer shared samples between steps) at the price of a longer ramp and drain.

``auto`` (`AutoSchedule`): a step takes a whole fresh unit when one is ready (the stream's
batch, bit for bit) and otherwise B samples drawn uniformly from the buffer; samples never run
out of uses and leave, oldest first, when the buffer is full.

Nothing here is per-sample Python: choices are tensor operations over the buffer's N entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamgen.config import min_capacity  # noqa: F401  (the launcher's check and the schedule agree)

AUTO = "auto"
STATE_FORMAT = "streamgen-replay/1"
UNLIMITED = 2**62  # uses left of an ``auto`` sample: it leaves only when the buffer is full


@dataclass(frozen=True)
class ReplaySettings:
    """What a rank's replay needs from the launcher, as plain values."""

    reuse: int | None  # K; None: auto
    capacity: int  # samples per rank (--stream.buffer)
    max_steps: int  # the run's steps: reuse K plans its ramp and drain around them
    seed: int  # the run seed: with the rank and the step, it seeds every draw
    on_device: bool = True  # hold the images on the trainer's device (the launcher checked they fit)
    resume_dir: str | None = None  # --resume: the checkpoint's folder, where its replay sidecars are
    keep: int = 2  # sidecars kept (as many steps as checkpoints kept, and last.ckpt's)

    @property
    def label(self) -> str:
        return AUTO if self.reuse is None else str(self.reuse)


def parse_reuse(text: str | int) -> int | None:
    """``--stream.reuse``: an integer K >= 1, or 'auto' (None); ValueError otherwise."""
    if str(text).strip().lower() == AUTO:
        return None
    value = int(str(text).strip())
    if value < 1:
        raise ValueError(value)
    return value


def sample_bytes(resolution: int) -> int:
    """Bytes one buffered sample needs: uint8 image, int64 label, id, uses and uses left, order."""
    return 3 * resolution * resolution + 5 * 8


def ramp_steps(batch: int, reuse: int, capacity: int, max_steps: int) -> int:
    """Steps of the all-fresh ramp (also 1/(K-1) of the drain): the largest that fits the buffer."""
    fits = (capacity - 2 * batch - reuse) // (batch * (reuse - 1))
    return max(1, min(fits, max_steps // reuse))


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for one step's draws on one rank (independent streams per rank and step)."""
    return int(np.random.SeedSequence((seed, rank, step)).generate_state(1, np.uint64)[0]) >> 1


class ReplayBuffer:
    """N samples of one rank: uint8 images on ``device``, bookkeeping on the host.

    An entry is empty (``uses == -1``), waiting for its fresh use (``uses == 0``) or used
    (``uses >= 1``) with ``left`` uses to go; it is freed when ``left`` reaches 0. ``order`` is
    the arrival number: the oldest entries are evicted first, and fresh samples are taken in
    arrival order. Where a unit is stored depends only on what arrived before it (lowest free
    entries first), so the content is a function of the arrival order alone.
    """

    def __init__(self, capacity: int, resolution: int, device: torch.device | str = "cpu") -> None:
        self.capacity, self.resolution, self.device = capacity, resolution, torch.device(device)
        self.images = torch.zeros(capacity, 3, resolution, resolution, dtype=torch.uint8, device=self.device)
        self.labels = torch.zeros(capacity, dtype=torch.int64)
        self.ids = torch.full((capacity,), -1, dtype=torch.int64)
        self.uses = torch.full((capacity,), -1, dtype=torch.int64)
        self.left = torch.zeros(capacity, dtype=torch.int64)
        self.order = torch.full((capacity,), -1, dtype=torch.int64)
        self.arrived = 0  # samples ever added: the next arrival number

    @property
    def occupied(self) -> torch.Tensor:
        return self.uses >= 0

    def __len__(self) -> int:
        return int(self.occupied.sum())

    def add(
        self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, uses_left: int, evict: bool
    ) -> torch.Tensor:
        """Store a unit (waiting for its fresh use); returns the entries it took, in unit order.

        Free entries are taken first (lowest index first); with ``evict``, the oldest samples
        make room when there are not enough, otherwise that is an error (reuse K never needs it).
        """
        n = len(ids)
        if n > self.capacity:
            raise ValueError(f"a unit of {n} samples does not fit a replay buffer of {self.capacity}")
        free = torch.nonzero(~self.occupied).flatten()
        if len(free) < n:
            if not evict:
                raise RuntimeError(f"the replay buffer of {self.capacity} samples is full: a schedule bug")
            age = torch.where(self.occupied, self.order, torch.iinfo(torch.int64).max)
            oldest = torch.topk(age, n - len(free), largest=False).indices
            self.uses[oldest] = -1
            free = torch.sort(torch.cat([free, oldest])).values
        slots = free[:n]
        self.images[slots.to(self.device)] = images.to(self.device, non_blocking=True)
        self.labels[slots] = labels.to("cpu", torch.int64)
        self.ids[slots] = ids.to("cpu", torch.int64)
        self.uses[slots] = 0
        self.left[slots] = uses_left
        self.order[slots] = torch.arange(self.arrived, self.arrived + n)
        self.arrived += n
        return slots

    def waiting(self) -> torch.Tensor:
        """Entries waiting for their fresh use, oldest first."""
        slots = torch.nonzero(self.uses == 0).flatten()
        return slots[torch.argsort(self.order[slots])]

    def replayable(self) -> torch.Tensor:
        """Mask of the entries that may be replayed: used once at least, uses left."""
        return (self.uses >= 1) & (self.left >= 1)

    def take(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """The samples at ``slots`` (copies), counted as used once; exhausted ones are freed."""
        out = {
            "image": self.images.index_select(0, slots.to(self.device)),
            "label": self.labels[slots],
            "id": self.ids[slots],
            "uses": self.uses[slots] + 1,
        }
        self.uses[slots] += 1
        self.left[slots] -= 1
        done = slots[self.left[slots] <= 0]
        self.uses[done] = -1
        return out

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        keep = torch.nonzero(self.occupied).flatten()  # only what is held: a sidecar of the content
        return {
            "capacity": self.capacity,
            "resolution": self.resolution,
            "slots": keep.clone(),
            "images": self.images.index_select(0, keep.to(self.device)).cpu(),
            "labels": self.labels[keep].clone(),
            "ids": self.ids[keep].clone(),
            "uses": self.uses[keep].clone(),
            "left": self.left[keep].clone(),
            "order": self.order[keep].clone(),
            "arrived": self.arrived,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity or state["resolution"] != self.resolution:
            raise RuntimeError(
                f"the replay sidecar holds a buffer of {state['capacity']} samples at {state['resolution']} px, "
                f"this run {self.capacity} at {self.resolution}"
            )
        slots = state["slots"]
        self.uses.fill_(-1)
        self.images[slots.to(self.device)] = state["images"].to(self.device)
        for name in ("labels", "ids", "uses", "left", "order"):
            getattr(self, name)[slots] = state[name]
        self.arrived = int(state["arrived"])


@dataclass(frozen=True)
class Draw:
    """One step's batch: buffer entries, the first ``fresh`` of them taken fresh."""

    slots: torch.Tensor
    fresh: int


class ReuseSchedule:
    """Deterministic reuse K: how many fresh samples each step takes, and which replays (module docstring)."""

    def __init__(self, batch: int, reuse: int, max_steps: int, capacity: int, seed: int, rank: int) -> None:
        if reuse < 1:
            raise ValueError("reuse must be at least 1")
        self.batch, self.reuse, self.max_steps = batch, reuse, max_steps
        self.seed, self.rank = seed, rank
        self.ramp = ramp_steps(batch, reuse, capacity, max_steps) if reuse > 1 else max_steps
        self.drain_start = max_steps - self.ramp * (reuse - 1)

    def fresh_before(self, step: int) -> int:
        """Fresh samples taken in steps ``0 .. step-1``."""
        b, k, m = self.batch, self.reuse, self.ramp
        step = min(step, self.max_steps)
        if step <= m:
            return step * b
        return m * b + math.ceil((min(step, self.drain_start) - m) * b / k)

    def fresh_at(self, step: int) -> int:
        return self.fresh_before(step + 1) - self.fresh_before(step)

    def needs_unit(self, step: int) -> bool:
        """Whether ``step`` takes samples of a unit not yet arrived (so the stream must deliver one)."""
        b = self.batch
        return -(-self.fresh_before(step + 1) // b) > -(-self.fresh_before(step) // b)

    def draw(self, buffer: ReplayBuffer, step: int) -> Draw:
        """The entries step ``step`` trains on: its fresh samples (oldest first), then its replays."""
        fresh = buffer.waiting()[: self.fresh_at(step)]
        replays = self.batch - len(fresh)
        if replays == 0:
            return Draw(fresh, len(fresh))
        candidates = buffer.replayable()
        g = torch.Generator().manual_seed(step_seed(self.seed, self.rank, step))
        noise = torch.rand(buffer.capacity, generator=g, dtype=torch.float64)
        # steady: uniform among the samples with uses left; drain: the most uses left first
        priority = noise + (buffer.left.to(torch.float64) if step >= self.drain_start else 0.0)
        priority = torch.where(candidates, priority, -math.inf)
        if int(candidates.sum()) < replays:
            raise RuntimeError(
                f"step {step}: {int(candidates.sum())} samples to replay, {replays} needed: a schedule bug"
            )
        chosen = torch.topk(priority, replays).indices
        return Draw(torch.cat([fresh, chosen]), len(fresh))


class AutoSchedule:
    """``auto``: the fresh unit when one is ready, else a batch drawn uniformly from the buffer."""

    def __init__(self, batch: int, seed: int, rank: int) -> None:
        self.batch, self.seed, self.rank = batch, seed, rank

    def draw(self, buffer: ReplayBuffer, step: int, fresh_unit: bool) -> Draw:
        if fresh_unit:
            fresh = buffer.waiting()
            return Draw(fresh, len(fresh))
        candidates = buffer.replayable()
        if int(candidates.sum()) < self.batch:
            raise RuntimeError(
                f"step {step}: the buffer holds {int(candidates.sum())} samples, a batch needs {self.batch}"
            )
        g = torch.Generator().manual_seed(step_seed(self.seed, self.rank, step))
        noise = torch.rand(buffer.capacity, generator=g, dtype=torch.float64)
        chosen = torch.topk(torch.where(candidates, noise, -math.inf), self.batch).indices
        return Draw(chosen, 0)


# -- the audit trail --------------------------------------------------------------------------


def id_ranges(ids: torch.Tensor | list[int]) -> str:
    """Sorted ids as compact ranges: ``[1, 2, 3, 7]`` -> ``1-3,7``; ``-`` for none."""
    values = sorted(int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids))
    if not values:
        return "-"
    parts, start, prev = [], values[0], values[0]
    for v in values[1:]:
        if v != prev + 1:
            parts.append(f"{start}-{prev}" if prev > start else str(start))
            start = v
        prev = v
    parts.append(f"{start}-{prev}" if prev > start else str(start))
    return ",".join(parts)


def parse_ranges(text: str) -> list[int]:
    if text == "-":
        return []
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out


def audit_line(step: int, unit: int | None, fresh_ids: torch.Tensor, replayed_ids: torch.Tensor) -> str:
    """One step of a replay run in ``consumed-rank{r}.tsv``: step, unit arrived (``-``: none),
    fresh ids, replayed ids (each as `id_ranges`)."""
    return f"{step}\t{'-' if unit is None else unit}\t{id_ranges(fresh_ids)}\t{id_ranges(replayed_ids)}"


def read_audit(path: str | Path) -> list[tuple[int, int | None, list[int], list[int]]]:
    """A replay run's audit trail: (step, unit or None, fresh ids, replayed ids) per step."""
    rows = []
    for line in Path(path).read_text().splitlines():
        step, unit, fresh, replayed = line.split("\t")
        rows.append((int(step), None if unit == "-" else int(unit), parse_ranges(fresh), parse_ranges(replayed)))
    return rows


def uses_per_id(rows: list[tuple[int, int | None, list[int], list[int]]]) -> dict[int, int]:
    """How many times each id was trained on, from `read_audit` rows."""
    counts: dict[int, int] = {}
    for _, _, fresh, replayed in rows:
        for i in (*fresh, *replayed):
            counts[i] = counts.get(i, 0) + 1
    return counts
