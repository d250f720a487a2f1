"""Compute accounting: device-seconds held, per role, the x-axis on which runs are compared.

A run holds devices: its generators (``--generators``) and its trainer ranks (``--trainers``).
Its compute is **device-seconds held** = devices x wall time, whether the devices are busy
or waiting, phase by phase:

- a **stream** run holds its generators and its trainers for the whole training wall time;
- a **cache** run holds its trainers while it trains, and adds the cache's build cost
  (``build.device_seconds`` of the cache's ``manifest.json``), whether this run or an earlier
  one built it; the build counts as generator compute. A run that builds its cache first
  starts its trainers afterwards, so a cache costs the same whoever built it.

**One rule for every source**: a device is charged from the moment it is held, which is when
the launcher spawns the process that holds it (a stream's generators, each trainer rank; a
cache build's generators, counted by the build itself), to the end of training. The launcher
hands those spawn times to the trainer (`held_since`, this node's ``time.monotonic()``, a
system-wide clock on Linux), so start-up (imports, model loading, the wait for the first
batch) is charged to a stream run exactly as it is to a cache build. The figure is frozen
at the end of training (`on_train_end`, after the final validation): the last log line,
``compute/total_gpu_hours``, the checkpoint and ``python -m streamgen.compare`` all read that
one figure. Totals are kept in checkpoints: ``--resume`` continues them (the time between the
last checkpoint and a crash is not counted: it bought nothing that the resumed run keeps).

`ComputeMonitor` logs, from rank 0 every ``train.log_every`` steps (after the update, at
``trainer.global_step``): ``compute/generator_gpu_hours``, ``compute/trainer_gpu_hours``,
``compute/total_gpu_hours``, ``data/images_seen`` (all ranks), ``data/unique_images``
(a stream: every image seen is new; a cache of N images: at most N; a stream through a replay
buffer: the samples trained on fresh, summed over ranks), ``data/mean_uses`` (seen / unique)
and, for a stream, ``stream/fresh_fraction`` (fresh / seen since the last point). These are
computed here and nowhere else; the terminal's ``uses=`` reads them. After each validation
it logs the validation metrics once more against compute: ``val_by_gpu_hours/<metric>``
(and, after each score of a `ScoresWhileTraining` callback such as the linear probes of
`streamgen.evaluate.probe_callback.LinearProbe`,
``probe_by_gpu_hours/<name>/top1``) with the TensorBoard step set to **milli-GPU-hours** (round(total GPU-hours x 1000)), so that curves of runs
line up by cost in TensorBoard. ``python -m streamgen.compare`` plots the exact values.

With ``train.budget_gpu_hours`` it stops the run (every DDP rank at the same step: rank 0's
decision is broadcast) after the last step that fits: it stops when the compute so far, plus
one more step (the smoothed cost of a step) and the final validation that a stop triggers
(its measured cost, or an estimate before the first), would pass the budget; ``last.ckpt``
is written there. So the total, final validation included, stays within the budget up to the
error of those estimates (at most about one step's cost). The same smoothed step time, blind
to validation and probe pauses, gives the progress bar its ETA (`eta_seconds`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from streamgen.train.checkpoint import StreamCheckpoint

SECONDS_PER_HOUR = 3600.0
STEP_SMOOTHING = 0.1  # weight of the latest step in the smoothed step time
MILLI = 1000  # TensorBoard steps of the *_by_gpu_hours tags are milli-GPU-hours
STATE_FORMAT = "streamgen-compute/1"
MANIFEST = "manifest.json"
DESCRIPTIONS = {  # TensorBoard's tooltip for each tag (where the logger shows descriptions)
    "compute/generator_gpu_hours": "device-hours held by generators: a stream run's generators x wall time; "
    "a cache run's build (from its manifest)",
    "compute/trainer_gpu_hours": "device-hours held by the trainer ranks: ranks x wall time",
    "compute/total_gpu_hours": "generator + trainer GPU-hours: what --train.budget_gpu_hours limits and "
    "python -m streamgen.compare puts on its x-axis",
    "data/images_seen": "images consumed by all trainer ranks so far",
    "data/unique_images": "distinct images among them: all of them for a stream, at most N for a cache of N, "
    "the samples trained on fresh with a replay buffer (--stream.reuse)",
    "data/mean_uses": "images seen / unique images: how many times an image was trained on, on average",
    "stream/fresh_fraction": "share of the images trained on since the last point that were fresh (1: no replay)",
    "val_by_gpu_hours/top1": "validation top-1 against compute: the step is milli-GPU-hours (1500 = 1.5 GPU-hours)",
    "val_by_gpu_hours/top5": "validation top-5 against compute: the step is milli-GPU-hours (1500 = 1.5 GPU-hours)",
}


class ScoresWhileTraining(L.Callback):
    """A callback that scores the model while it trains (the linear probes of
    `streamgen.evaluate.probe_callback`). ``last`` holds each score's latest result,
    ``{name: {"step": int, "top1": float, ...}}``; `ComputeMonitor` logs every new one once more
    against compute, as ``probe_by_gpu_hours/<name>/top1``."""

    def __init__(self) -> None:
        self.last: dict[str, dict] = {}


@dataclass(frozen=True)
class BuildCost:
    """What building a cache cost, as its manifest records it."""

    device_seconds: float = 0.0
    devices: int = 0
    images: int | None = None  # the cache's size N, when the manifest says


def read_build_cost(cache_dir: str | Path, warn: Callable[[str], None] | None = None) -> BuildCost:
    """The build cost in ``cache_dir/manifest.json``; zero (with a warning) if it is unreadable.

    Read defensively: a cache run's checks have already accepted the cache, so a missing or
    malformed cost must not stop training, only be said once.
    """
    path = Path(cache_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        build = manifest.get("build") or {}
        seconds = float(build.get("device_seconds", 0.0))
        devices = int(build.get("devices", 0))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        if warn:
            warn(f"cannot read the cache's build cost from {path} ({type(e).__name__}): counting it as 0")
        return BuildCost()
    if not math.isfinite(seconds) or seconds < 0:
        if warn:
            warn(f"{path}: build.device_seconds is {seconds}: counting it as 0")
        seconds = 0.0
    images = (manifest.get("layout") or {}).get("images", manifest.get("images"))
    return BuildCost(seconds, devices, int(images) if isinstance(images, (int, float)) else None)


@dataclass
class ComputeLedger:
    """Device-seconds per role: earlier sessions (from the checkpoint) + this one (devices x wall).

    ``generators`` and ``trainers`` are the devices this session holds until it ends (a cache
    run's training holds no generator); ``started`` is when the trainers were spawned and
    ``generators_started`` when the generators were (None: at ``started``); ``build_seconds``
    is a fixed cost (a cache's build, counted as generator compute).
    """

    generators: int
    trainers: int
    started: float
    build_seconds: float = 0.0
    earlier_generator_seconds: float = 0.0
    earlier_trainer_seconds: float = 0.0
    generators_started: float | None = None

    def generator_seconds(self, now: float) -> float:
        return self.build_seconds + self._held_generator_seconds(now)

    def trainer_seconds(self, now: float) -> float:
        return self.earlier_trainer_seconds + self.trainers * self._wall(now)

    def total_seconds(self, now: float) -> float:
        return self.generator_seconds(now) + self.trainer_seconds(now)

    def carried(self, now: float) -> dict[str, float]:
        """What a checkpoint keeps: the held device-seconds so far, without the fixed build cost."""
        return {
            "generator_device_seconds": self._held_generator_seconds(now),
            "trainer_device_seconds": self.trainer_seconds(now),
        }

    def devices(self) -> int:
        """Devices held now: what one second of this session costs, in device-seconds."""
        return self.generators + self.trainers

    def _held_generator_seconds(self, now: float) -> float:
        since = self.started if self.generators_started is None else self.generators_started
        return self.earlier_generator_seconds + self.generators * max(0.0, now - since)

    def _wall(self, now: float) -> float:
        return max(0.0, now - self.started)


def gpu_hours(device_seconds: float) -> float:
    return device_seconds / SECONDS_PER_HOUR


def milli_gpu_hours(device_seconds: float) -> int:
    """The TensorBoard step of the ``*_by_gpu_hours`` tags."""
    return round(gpu_hours(device_seconds) * MILLI)


class ComputeMonitor(L.Callback):
    """Accounts, logs and (with a budget) limits a run's compute; see the module docstring.

    ``generators`` and ``trainers`` are one node's; with several nodes (DDP world =
    nodes x trainers) every node holds as many, and `setup` scales the counts.
    ``held_since``: (generators, trainers) spawn times on ``clock`` (the launcher's), None: now.
    ``final_validation``: a stop triggers a validation (the run has a val set), whose cost the
    budget reserves. The current figures are attributes, for progress displays:
    ``generator_gpu_hours``, ``trainer_gpu_hours``, ``total_gpu_hours``, ``images_seen``,
    ``unique_images``, ``budget_gpu_hours``, ``step_seconds``; they stop moving at the end of
    training (`ended`).
    """

    def __init__(
        self,
        generators: int,
        trainers: int,
        log_every: int = 50,
        budget_gpu_hours: float | None = None,
        build: BuildCost | None = None,
        unique_limit: int | None = None,
        checkpoint_dir: str | Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] | None = None,
        held_since: tuple[float, float] | None = None,
        final_validation: bool = False,
    ) -> None:
        self.clock = clock
        self.build = build or BuildCost()
        since_generators, since_trainers = held_since if held_since is not None else (clock(), clock())
        self.ledger = ComputeLedger(
            generators,
            trainers,
            since_trainers,
            build_seconds=self.build.device_seconds,
            generators_started=since_generators,
        )
        self.per_node = (generators, trainers)
        self.log_every = log_every
        self.budget_gpu_hours = budget_gpu_hours
        self.unique_limit = unique_limit  # a cache's N: no more unique images than that
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.say = log or _stderr  # not self.log: Lightning sets callback.log
        self.final_validation = final_validation
        self.images_seen = 0
        self.fresh_seen: int | None = None  # replay: fresh samples of all ranks at the last count
        self._window_start = (0, 0)  # (images seen, unique) at the last logged point: fresh_fraction
        self.stopped_by_budget = False
        self.ended: float | None = None  # the clock at the end of training: the figures are frozen there
        self.step_seconds: float | None = None  # smoothed wall time of one step, pauses left out
        self.validation_seconds: float | None = None  # wall time of the latest validation
        self._last_step_end: float | None = None
        self._paused = 0.0  # seconds of evaluation since the last step ended
        self._val_started: float | None = None
        self._stop_step: int | None = None
        self._probed: dict[str, int] = {}  # probe name -> the step of its result last logged by cost
        self._val_batches: int | None = None  # for the validation estimate before the first one
        self._saved_at: float | None = None  # the clock of the last checkpoint, until the next step or validation

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        run_dir: str | Path,
        log: Callable[[str], None] | None = None,
        held_since: tuple[float, float] | None = None,
    ) -> ComputeMonitor:
        """The monitor of a run: a stream holds its generators while training; a cache adds its build."""
        log = log or _stderr
        source = getattr(cfg, "source", "stream")
        if source == "cache":
            build = read_build_cost(cfg.cache.dir, warn=log)
            limit = build.images or getattr(cfg.cache, "images", None)
            generators = 0
        else:
            build, limit, generators = BuildCost(), None, cfg.generators
        monitor = cls(
            generators=generators,
            trainers=cfg.trainers,
            log_every=cfg.train.log_every,
            budget_gpu_hours=getattr(cfg.train, "budget_gpu_hours", None),
            build=build,
            unique_limit=limit,
            checkpoint_dir=Path(run_dir) / "checkpoints",
            log=log,
            held_since=held_since,
            final_validation=bool(getattr(cfg.train, "val_dir", None)),
        )
        monitor.stream = source != "cache"
        return monitor

    # -- the figures ----------------------------------------------------------------------------

    def now(self) -> float:
        """The accounting clock: frozen at the end of training, so that every reader sees one figure."""
        return self.ended if self.ended is not None else self.clock()

    @property
    def generator_gpu_hours(self) -> float:
        return gpu_hours(self.ledger.generator_seconds(self.now()))

    @property
    def trainer_gpu_hours(self) -> float:
        return gpu_hours(self.ledger.trainer_seconds(self.now()))

    @property
    def total_gpu_hours(self) -> float:
        return gpu_hours(self.ledger.total_seconds(self.now()))

    stream = False  # a stream run (from_config): it logs stream/fresh_fraction

    @property
    def unique_images(self) -> int:
        if self.fresh_seen is not None:  # a replay buffer: what its ranks trained on fresh
            return self.fresh_seen
        if self.unique_limit is None:
            return self.images_seen
        return min(self.unique_limit, self.images_seen)

    @property
    def mean_uses(self) -> float:
        """Images seen per unique image: 1 for a stream, epochs for a cache, the reuse with replay."""
        return self.images_seen / self.unique_images if self.unique_images else math.nan

    def metrics(self) -> dict[str, float]:
        now = self.now()
        out = {
            "compute/generator_gpu_hours": gpu_hours(self.ledger.generator_seconds(now)),
            "compute/trainer_gpu_hours": gpu_hours(self.ledger.trainer_seconds(now)),
            "compute/total_gpu_hours": gpu_hours(self.ledger.total_seconds(now)),
            "data/images_seen": float(self.images_seen),
            "data/unique_images": float(self.unique_images),
        }
        if self.unique_images:
            out["data/mean_uses"] = self.mean_uses
        seen0, unique0 = self._window_start
        if self.stream and self.images_seen > seen0:
            out["stream/fresh_fraction"] = (self.unique_images - unique0) / (self.images_seen - seen0)
        return out

    def _count_fresh(self, trainer: L.Trainer) -> None:
        """Replay: the fresh samples of every rank (a collective: every rank calls it at the same steps)."""
        mine = getattr(getattr(trainer, "datamodule", None), "fresh_images", None)
        if mine is None:
            return
        import torch

        total = trainer.strategy.reduce(
            torch.tensor(float(mine), dtype=torch.float64, device=trainer.strategy.root_device), reduce_op="sum"
        )
        self.fresh_seen = int(round(float(total)))

    def step_device_seconds(self) -> float:
        """What one more step costs: the smoothed step time x the devices held (0 before it is known)."""
        return (self.step_seconds or 0.0) * self.ledger.devices()

    def reserve_device_seconds(self) -> float:
        """What the final validation after a stop will cost: the latest one's wall time (an estimate
        from the step time before the first) x the devices held; 0 for a run without validation."""
        if not self.final_validation:
            return 0.0
        seconds = self.validation_seconds
        if seconds is None:  # no validation yet: a forward pass costs at most a training step
            seconds = (self._val_batches or 0) * (self.step_seconds or 0.0)
        return seconds * self.ledger.devices()

    def budget_reached(self) -> bool:
        """True when the next step and the final validation would pass the budget: stop now."""
        if self.budget_gpu_hours is None:
            return False
        planned = self.ledger.total_seconds(self.now()) + self.step_device_seconds() + self.reserve_device_seconds()
        return planned > self.budget_gpu_hours * SECONDS_PER_HOUR * (1 + 1e-9)

    def budget_steps_left(self) -> float:
        """Steps that still fit in the budget (inf without a budget or before the step time is known)."""
        cost = self.step_device_seconds()
        if self.budget_gpu_hours is None or cost <= 0:
            return math.inf
        left = self.budget_gpu_hours * SECONDS_PER_HOUR - self.ledger.total_seconds(self.now())
        return max(0.0, math.floor((left - self.reserve_device_seconds()) / cost))

    def eta_seconds(self, step: int, max_steps: int) -> float | None:
        """Seconds to whichever comes first, ``max_steps`` or the budget, at the smoothed step time
        (evaluation pauses left out); None while the step time is unknown."""
        if self.step_seconds is None:
            return None
        steps = min(max_steps - step if max_steps > 0 else math.inf, self.budget_steps_left())
        return None if math.isinf(steps) else max(0.0, steps) * self.step_seconds

    # -- Lightning hooks ------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        generators, trainers = self.per_node
        nodes = max(1, trainer.world_size // max(1, trainers))
        self.ledger.generators, self.ledger.trainers = generators * nodes, trainers * nodes
        descriptions = getattr(trainer.logger, "descriptions", None)
        if isinstance(descriptions, dict):
            for tag, text in DESCRIPTIONS.items():
                descriptions.setdefault(tag, text)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.final_validation and self.budget_gpu_hours is not None and self.validation_seconds is None:
            self._val_batches = _val_batches(trainer)
        if trainer.is_global_zero and self.budget_reached():
            self.say(
                f"this run starts at {self.total_gpu_hours:.4g} GPU-hours (a cache's build, or the compute of the "
                f"checkpoint it resumes), at or over --train.budget_gpu_hours {self.budget_gpu_hours:g}: "
                "it stops after its first step"
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.images_seen += _batch_images(batch) * trainer.world_size
        self._saved_at = None  # a step since the last checkpoint (this step's is written after this hook)
        step = trainer.global_step
        probed = self._log_probes_by_cost(trainer)  # a probe that ran since the last step
        self._time_step(paused_unmeasured=probed)
        stop = False
        if self.budget_gpu_hours is not None:
            # Every rank must stop at the same step (the checkpoint is a collective): rank 0 decides.
            stop = bool(trainer.strategy.broadcast(self.budget_reached(), src=0))
        if stop or step % self.log_every == 0:
            self._count_fresh(trainer)  # on every rank: the same steps everywhere
            self._log_compute(trainer, step)
        if stop:
            self._stop(trainer, step)

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        self._val_started = self.clock()

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._val_started is not None and not trainer.sanity_checking:
            self.validation_seconds = max(0.0, self.clock() - self._val_started)
            self._paused += self.validation_seconds  # not a training step's time
            self._val_started = None
            self._saved_at = None  # a checkpoint before this validation lacks its cost
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.logger is None:
            return
        self._log_compute(trainer, trainer.global_step)  # the exact compute at this evaluation, once more
        by_cost = {}
        for key, value in trainer.callback_metrics.items():
            section, _, metric = key.partition("/")
            if section == "val" and metric in ("top1", "top5", "loss"):
                by_cost[f"val_by_gpu_hours/{metric}"] = float(value)
        if by_cost:
            _write(trainer.logger, by_cost, milli_gpu_hours(self.ledger.total_seconds(self.now())))
        self._log_probes_by_cost(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._count_fresh(trainer)
        # From here on every reader (log line, checkpoint, TensorBoard) sees this figure: that of a
        # checkpoint written since the last step or validation (last.ckpt at the stop), else now
        # (the checkpoint written after this, at the end of fit, then holds it too).
        self.ended = self._saved_at if self._saved_at is not None else self.clock()
        self._log_compute(trainer, trainer.global_step)  # the run's final figures
        if self.stopped_by_budget and trainer.is_global_zero:
            self.say(
                f"stopped by the compute budget of {self.budget_gpu_hours:g} GPU-hours (--train.budget_gpu_hours) "
                f"after step {self._stop_step}: {self.total_gpu_hours:.4f} GPU-hours in all"
                + (", final validation included" if self.final_validation else "")
            )

    def state_dict(self) -> dict[str, Any]:
        self._saved_at = now = self.now()  # a checkpoint holds the figure of this moment
        return {"format": STATE_FORMAT, **self.ledger.carried(now), "images_seen": self.images_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            return
        self.ledger.earlier_generator_seconds = float(state["generator_device_seconds"])
        self.ledger.earlier_trainer_seconds = float(state["trainer_device_seconds"])
        self.images_seen = int(state["images_seen"])

    # -- helpers --------------------------------------------------------------------------------

    def _time_step(self, paused_unmeasured: bool = False) -> None:
        """Smooth the wall time of one step (an exponential average), leaving out validations
        (measured) and intervals in which a probe ran (not measured here: skipped). The first
        interval, from the start, holds start-up and is skipped too."""
        now = self.clock()
        if self._last_step_end is not None and not paused_unmeasured:
            seconds = now - self._last_step_end - self._paused
            if seconds > 0:
                previous = self.step_seconds
                self.step_seconds = seconds if previous is None else previous + STEP_SMOOTHING * (seconds - previous)
        self._last_step_end, self._paused = now, 0.0

    def _log_compute(self, trainer: L.Trainer, step: int) -> None:
        """The figures at ``step``; logged again at the same step when they changed (after a
        validation, at the end): the last value of a step is the one every reader takes."""
        if not trainer.is_global_zero or trainer.logger is None:
            return
        _write(trainer.logger, self.metrics(), step)
        self._window_start = (self.images_seen, self.unique_images)  # stream/fresh_fraction's window

    def _log_probes_by_cost(self, trainer: L.Trainer) -> bool:
        """Scores made since the last call (`ScoresWhileTraining.last`), once more at milli-GPU-hours;
        True if there was one (on every rank: a probe is a pause in training)."""
        by_cost = {}
        for probe in (cb for cb in trainer.callbacks if isinstance(cb, ScoresWhileTraining)):
            for name, last in probe.last.items():
                if self._probed.get(name) != last["step"]:
                    self._probed[name] = last["step"]
                    by_cost[f"probe_by_gpu_hours/{name}/top1"] = float(last["top1"])
        if by_cost and trainer.is_global_zero and trainer.logger is not None:
            _write(trainer.logger, by_cost, milli_gpu_hours(self.ledger.total_seconds(self.now())))
        return bool(by_cost)

    def _stop(self, trainer: L.Trainer, step: int) -> None:
        trainer.should_stop = True
        self.stopped_by_budget = True
        self._stop_step = step
        saver = next((cb for cb in trainer.callbacks if isinstance(cb, StreamCheckpoint)), None)
        if saver is None and self.checkpoint_dir is not None:  # a StreamCheckpoint writes last.ckpt itself
            trainer.save_checkpoint(self.checkpoint_dir / "last.ckpt")  # on every rank: saving is a collective
        if trainer.is_global_zero:
            self.say(
                f"stopping: the next step would pass the compute budget of {self.budget_gpu_hours:g} GPU-hours "
                f"(--train.budget_gpu_hours): {self.total_gpu_hours:.4f} GPU-hours after step {step}"
                + (", then the final validation" if self.final_validation else "")
            )


def _val_batches(trainer: L.Trainer) -> int | None:
    """Batches of one validation (this rank's), for the estimate of its cost before the first one."""
    datamodule = getattr(trainer, "datamodule", None)
    try:
        return len(datamodule.val_dataloader())
    except Exception:  # no val loader, or one without a length: no estimate
        return None


def _write(logger: Any, metrics: dict[str, float], step: int) -> None:
    """Scalars at exactly ``step``: straight to TensorBoard where the logger allows it (a logger's
    ``log_metrics`` may impose its own step convention, which the ``*_by_gpu_hours`` tags must escape)."""
    add = getattr(logger, "add_scalar", None) or getattr(getattr(logger, "experiment", None), "add_scalar", None)
    if add is None:
        logger.log_metrics(metrics, step=step)
        return
    for tag, value in metrics.items():
        add(tag, float(value), step)


def _batch_images(batch: Any) -> int:
    """Images in one rank's batch (a dict with "label", or an (images, labels) pair)."""
    if isinstance(batch, dict):
        batch = batch.get("label", batch.get("image"))
    elif isinstance(batch, (tuple, list)):
        batch = batch[-1]
    return len(batch)


def _stderr(message: str) -> None:
    print(f"streamgen: {message}", file=sys.stderr, flush=True)
