"""Compute accounting: device-seconds held, per role, the x-axis on which runs are compared.

A run holds devices: its generators (``--generators``) and its trainer ranks (``--trainers``).
Its compute is **device-seconds held** = devices x wall time, whether the devices are busy
or waiting, phase by phase:

- a **stream** run holds its generators and its trainers for the whole training wall time;
- a **cache** run holds its trainers while it trains, and adds the cache's build cost
  (``build.device_seconds`` of the cache's ``manifest.json``), whether this run or an earlier
  one built it; the build counts as generator compute. A run that builds its cache first
  starts its trainers afterwards, so a cache costs the same whoever built it.

The training wall time runs from the moment the trainer rank starts (before Lightning sets
up, so model loading and the wait for the first batch count) to the step being logged.
Totals are kept in checkpoints: ``--resume`` continues them (the time between the last
checkpoint and a crash is not counted: it bought nothing that the resumed run keeps).

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
decision is broadcast) at the first step whose accounted compute reaches the budget, and
writes ``checkpoints/last.ckpt`` there.
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

    ``generators`` and ``trainers`` are the devices this session holds for its whole wall
    time (a cache run's training holds no generator); ``build_seconds`` is a fixed cost
    (a cache's build, counted as generator compute).
    """

    generators: int
    trainers: int
    started: float
    build_seconds: float = 0.0
    earlier_generator_seconds: float = 0.0
    earlier_trainer_seconds: float = 0.0

    def generator_seconds(self, now: float) -> float:
        return self.build_seconds + self.earlier_generator_seconds + self.generators * self._wall(now)

    def trainer_seconds(self, now: float) -> float:
        return self.earlier_trainer_seconds + self.trainers * self._wall(now)

    def total_seconds(self, now: float) -> float:
        return self.generator_seconds(now) + self.trainer_seconds(now)

    def carried(self, now: float) -> dict[str, float]:
        """What a checkpoint keeps: the held device-seconds so far, without the fixed build cost."""
        return {
            "generator_device_seconds": self.earlier_generator_seconds + self.generators * self._wall(now),
            "trainer_device_seconds": self.trainer_seconds(now),
        }

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
    The current figures are attributes, for progress displays: ``generator_gpu_hours``,
    ``trainer_gpu_hours``, ``total_gpu_hours``, ``images_seen``, ``unique_images``,
    ``budget_gpu_hours``.
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
    ) -> None:
        self.clock = clock
        self.build = build or BuildCost()
        self.ledger = ComputeLedger(generators, trainers, clock(), build_seconds=self.build.device_seconds)
        self.per_node = (generators, trainers)
        self.log_every = log_every
        self.budget_gpu_hours = budget_gpu_hours
        self.unique_limit = unique_limit  # a cache's N: no more unique images than that
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.say = log or _stderr  # not self.log: Lightning sets callback.log
        self.images_seen = 0
        self.fresh_seen: int | None = None  # replay: fresh samples of all ranks at the last count
        self._window_start = (0, 0)  # (images seen, unique) at the last logged point: fresh_fraction
        self.stopped_by_budget = False
        self._logged_step = -1
        self._probed: dict[str, int] = {}  # probe name -> the step of its result last logged by cost

    @classmethod
    def from_config(cls, cfg: Any, run_dir: str | Path, log: Callable[[str], None] | None = None) -> ComputeMonitor:
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
        )
        monitor.stream = source != "cache"
        return monitor

    # -- the figures ----------------------------------------------------------------------------

    @property
    def generator_gpu_hours(self) -> float:
        return gpu_hours(self.ledger.generator_seconds(self.clock()))

    @property
    def trainer_gpu_hours(self) -> float:
        return gpu_hours(self.ledger.trainer_seconds(self.clock()))

    @property
    def total_gpu_hours(self) -> float:
        return gpu_hours(self.ledger.total_seconds(self.clock()))

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
        now = self.clock()
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

    def budget_reached(self) -> bool:
        return self.budget_gpu_hours is not None and self.total_gpu_hours >= self.budget_gpu_hours

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
        if trainer.is_global_zero and self.budget_reached():
            self.say(
                f"this run starts at {self.total_gpu_hours:.4g} GPU-hours (a cache's build, or the compute of the "
                f"checkpoint it resumes), at or over --train.budget_gpu_hours {self.budget_gpu_hours:g}: "
                "it stops after its first step"
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.images_seen += _batch_images(batch) * trainer.world_size
        step = trainer.global_step
        stop = False
        if self.budget_gpu_hours is not None:
            # Every rank must stop at the same step (the checkpoint is a collective): rank 0 decides.
            stop = bool(trainer.strategy.broadcast(self.budget_reached(), src=0))
        if stop or step % self.log_every == 0:
            self._count_fresh(trainer)  # on every rank: the same steps everywhere
            self._log_compute(trainer, step)
        self._log_probes_by_cost(trainer)  # a probe that ran since the last step
        if stop:
            self._stop(trainer, step)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.logger is None:
            return
        self._log_compute(trainer, trainer.global_step)  # the exact compute at this evaluation
        by_cost = {}
        for key, value in trainer.callback_metrics.items():
            section, _, metric = key.partition("/")
            if section == "val" and metric in ("top1", "top5", "loss"):
                by_cost[f"val_by_gpu_hours/{metric}"] = float(value)
        if by_cost:
            _write(trainer.logger, by_cost, milli_gpu_hours(self.ledger.total_seconds(self.clock())))
        self._log_probes_by_cost(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._count_fresh(trainer)
        self._log_compute(trainer, trainer.global_step)  # the run's final figures

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **self.ledger.carried(self.clock()), "images_seen": self.images_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            return
        self.ledger.earlier_generator_seconds = float(state["generator_device_seconds"])
        self.ledger.earlier_trainer_seconds = float(state["trainer_device_seconds"])
        self.images_seen = int(state["images_seen"])

    # -- helpers --------------------------------------------------------------------------------

    def _log_compute(self, trainer: L.Trainer, step: int) -> None:
        if not trainer.is_global_zero or trainer.logger is None or step == self._logged_step:
            return
        _write(trainer.logger, self.metrics(), step)
        self._logged_step = step
        self._window_start = (self.images_seen, self.unique_images)

    def _log_probes_by_cost(self, trainer: L.Trainer) -> None:
        """Scores made since the last call (`ScoresWhileTraining.last`), once more at milli-GPU-hours."""
        if not trainer.is_global_zero or trainer.logger is None:
            return
        by_cost = {}
        for probe in (cb for cb in trainer.callbacks if isinstance(cb, ScoresWhileTraining)):
            for name, last in probe.last.items():
                if self._probed.get(name) != last["step"]:
                    self._probed[name] = last["step"]
                    by_cost[f"probe_by_gpu_hours/{name}/top1"] = float(last["top1"])
        if by_cost:
            _write(trainer.logger, by_cost, milli_gpu_hours(self.ledger.total_seconds(self.clock())))

    def _stop(self, trainer: L.Trainer, step: int) -> None:
        trainer.should_stop = True
        self.stopped_by_budget = True
        path = None
        saver = next((cb for cb in trainer.callbacks if isinstance(cb, StreamCheckpoint)), None)
        if saver is not None:  # it writes last.ckpt at this step (it runs after this callback)
            path = Path(saver.dirpath) / "last.ckpt"
        elif self.checkpoint_dir is not None:
            path = self.checkpoint_dir / "last.ckpt"
            trainer.save_checkpoint(path)  # on every rank: saving gathers every rank's state
        if trainer.is_global_zero:
            where = f"; checkpoint {path}" if path else ""
            self.say(
                f"stopping: the compute budget of {self.budget_gpu_hours:g} GPU-hours "
                f"(--train.budget_gpu_hours) is reached: {self.total_gpu_hours:.4f} GPU-hours at step {step}{where}"
            )


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
