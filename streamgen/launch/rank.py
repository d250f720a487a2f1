"""The body of one trainer rank: a spawned process that runs Lightning's fit on its source.

The launcher (`streamgen.launch.launcher`) spawns one per rank with a `TrainerSpec`; ranks form one
DDP group. Everything here runs after the checks: bad input never reaches a trainer.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from streamgen.launch.checks import Job
from streamgen.launch.nodes import without_outer_launcher
from streamgen.stream.control import StopControl
from streamgen.stream.heartbeat import Pulse
from streamgen.stream.queue import OwnerDied, SlotQueue, StreamClosed, avoid_named_semaphores
from streamgen.stream.worker import GeneratorStats

STOP_REASON = "stopping: the run was interrupted"


@dataclass(frozen=True)
class TrainerSpec:
    rank: int  # global rank over all nodes
    job: Job
    run_dir: str
    threads: int
    env: dict[str, str]
    control: StopControl | None = None  # the launcher's stop request: stop after this step and save
    pulse: Pulse | None = None  # this rank's heartbeat, read by the launcher's trainer watchdog


def _lost_peer(error: BaseException) -> bool:
    """An error from the process group after another rank has gone (stopped, failed, killed)."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    markers = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Broken pipe")
    return isinstance(error, RuntimeError) and any(m in text for m in markers)


def trainer_main(spec: TrainerSpec, queue: SlotQueue, stats: GeneratorStats) -> None:
    """One trainer rank (a spawned process): Lightning fit on this rank's queue."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher owns shutdown: it turns
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # Ctrl-C and SIGTERM into a stop request
    avoid_named_semaphores()
    outer = set(os.environ) - set(without_outer_launcher(dict(os.environ)))
    for name in outer:  # torchrun's / SLURM's view of the launcher, not of this rank
        del os.environ[name]
    os.environ.update(spec.env)
    from streamgen.train.checkpoint import CheckpointWriteError
    from streamgen.train.stream_data import StopRequested

    try:
        _fit(spec, queue, stats)
    except StreamClosed as e:
        if str(e) != STOP_REASON:
            print(f"\nstreamgen: the stream stopped: {e}", file=sys.stderr)
            raise SystemExit(1) from None
    except OwnerDied as e:
        print(f"\nstreamgen: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except StopRequested:
        pass  # stopped before its first step: nothing to save
    except CheckpointWriteError as e:
        print(f"\nstreamgen: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as e:
        if spec.job.world == 1 or not _lost_peer(e):
            raise
        # Another rank stopped or failed first (it said why); this one's collective broke.
        print(f"streamgen: trainer rank {spec.rank} stopped: another rank left the group", file=sys.stderr)
        raise SystemExit(1) from None


def _fit(spec: TrainerSpec, queue: SlotQueue, stats: GeneratorStats) -> None:
    import lightning as L
    import torch

    cfg = spec.job.cfg
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.set_float32_matmul_precision("high")
    L.seed_everything((cfg.seed + spec.rank) % 2**32, verbose=False)  # numpy's seeds are 32-bit
    model = build_model(spec)
    data = build_datamodule(spec, queue)
    logger = build_logger(spec)
    trainer = build_trainer(spec, logger, build_callbacks(spec, queue, stats))
    trainer.fit(model, datamodule=data, ckpt_path=cfg.resume)


def build_model(spec: TrainerSpec):
    """The LightningModule: network, loss and optimiser settings from the config."""
    from streamgen.train.budget import warmup_steps
    from streamgen.train.model import Classifier

    job, cfg, t = spec.job, spec.job.cfg, spec.job.cfg.train
    return Classifier(
        arch=t.arch,
        class_keys=job.plan.classes.keys,
        lr=t.lr * cfg.stream.batch_size * job.world / 256,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        # A fraction of max_steps, epochs of a cache (config.validate allows them only there), or steps.
        warmup_steps=warmup_steps(t, job.steps_per_epoch),
        max_steps=t.max_steps,
        label_smoothing=t.label_smoothing,
        class_fingerprint=job.plan.classes.fingerprint(),
        head=t.head,
        min_lr=t.min_lr,
        memory_size=t.memory_size,
    )


def build_datamodule(spec: TrainerSpec, queue: SlotQueue | None):
    """The source of training batches: stream or cache, chosen by `streamgen.train.source`."""
    from streamgen.train.augment import build_augment
    from streamgen.train.datamodule import make_datamodule

    data = make_datamodule(
        spec.job.source_spec(), spec.rank, spec.run_dir, queue, _while_waiting(spec), _val_loader(spec)
    )
    data.augment = build_augment(spec.job.cfg.train)  # --train.augment: single crop or multi-crop
    return data


def _val_loader(spec: TrainerSpec) -> Callable[[], Any] | None:
    """The real-image validation loader of ``train.val_dir`` (this rank's share), or None."""
    t = spec.job.cfg.train
    if not t.val_dir:
        return None
    from streamgen.evaluate.realdata import val_loader
    from streamgen.train.augment import eval_transform

    keys, world = spec.job.plan.classes.keys, spec.job.world
    return partial(val_loader, t.val_dir, keys, eval_transform(t.crop), t.val_batch_size, t.workers, spec.rank, world)


def _while_waiting(spec: TrainerSpec) -> Callable[[], bool] | None:
    """What the stream calls about once a second while the rank waits for data: it beats (waiting
    is not a hang, for the trainer watchdog) and answers whether a stop was requested."""
    if spec.control is None and spec.pulse is None:
        return None

    def stop_requested() -> bool:
        if spec.pulse is not None:
            spec.pulse.beat(waiting=True)
        return spec.control is not None and spec.control.requested

    return stop_requested


def build_logger(spec: TrainerSpec):
    from streamgen.train.callbacks import StreamLogger

    run_dir = Path(spec.run_dir)
    return StreamLogger(
        save_dir=str(run_dir.parent.parent), name=run_dir.parent.name, version=run_dir.name, default_hp_metric=False
    )


def build_callbacks(spec: TrainerSpec, queue: SlotQueue, stats: GeneratorStats) -> list:
    from lightning.pytorch.callbacks import LambdaCallback

    from streamgen.train.callbacks import StepProgressBar, StreamMonitor, gpu_devices
    from streamgen.train.checkpoint import StopAndSave, StreamCheckpoint
    from streamgen.train.compute import ComputeMonitor

    job, t = spec.job, spec.job.cfg.train
    monitor = StreamMonitor(  # first: the progress bar shows what it measured at the same step
        queue,
        stats,
        job.plan,
        job.world,
        t.log_every,
        devices=gpu_devices(job.generator_devices, job.trainer_devices),
        run_config=Path(spec.run_dir) / "config.yaml",
        max_steps=t.max_steps,
    )
    return [
        monitor,
        ComputeMonitor.from_config(job.cfg, spec.run_dir),  # compute/*, data/*, --train.budget_gpu_hours
        StepProgressBar(monitor, t.log_every),
        *([build_probe(spec)] if t.probes else []),
        *([StopAndSave(spec.control)] if spec.control is not None else []),
        *([LambdaCallback(**spec.pulse.hooks())] if spec.pulse is not None else []),  # the trainer watchdog's beats
        StreamCheckpoint(  # also writes last.ckpt wherever fit stops early (trainer.should_stop)
            dirpath=Path(spec.run_dir) / "checkpoints",
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=t.checkpoint_every,
            monitor="step",
            mode="max",
            save_top_k=t.keep_checkpoints,
            save_last=True,
        ),
    ]


def build_probe(spec: TrainerSpec):
    """The linear-probe callback (--train.probes): Tab. 2's protocol every probe_every steps, logs probe/*."""
    from streamgen.evaluate.probe_callback import LinearProbe
    from streamgen.evaluate.transfer import parse_probes

    t = spec.job.cfg.train
    beat = spec.pulse.beat if spec.pulse is not None else None  # a probe is progress for the trainer watchdog
    return LinearProbe(
        parse_probes(t.probes), t.probe_every, t.crop, t.probe_subset, t.val_batch_size, t.workers, beat=beat
    )


def build_trainer(spec: TrainerSpec, logger, callbacks: list):
    import lightning as L

    from streamgen.train.callbacks import quiet_libraries
    from streamgen.train.checkpoint import AtomicCheckpointIO

    quiet_libraries()  # no tips or banners; real warnings still show
    job, t = spec.job, spec.job.cfg.train
    world = job.world
    return L.Trainer(
        accelerator=job.accelerator,
        devices=job.trainer_devices,
        strategy=_strategy(job) if world > 1 else "auto",
        num_nodes=job.placement.nodes,
        plugins=[
            _cluster_environment(),
            AtomicCheckpointIO(),
        ],  # atomic: never a partial file under a checkpoint's name
        max_steps=t.max_steps,
        max_epochs=-1,
        precision=resolve_precision(job),
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=t.log_every,
        val_check_interval=t.val_every if t.val_dir else None,
        check_val_every_n_epoch=None,
        limit_val_batches=None if t.val_dir else 0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        sync_batchnorm=t.sync_batchnorm and world > 1,
        enable_model_summary=False,  # a table of one row; the config text says what the model is
    )


def resolve_precision(job: Job) -> str:
    """``train.precision`` with ``auto`` decided: bf16-mixed on GPUs, 32-true on CPUs."""
    t = job.cfg.train
    return t.precision if t.precision != "auto" else ("bf16-mixed" if job.accelerator == "gpu" else "32-true")


def _strategy(job: Job):
    """DDP with a collective timeout far below torch's 30 minutes: a lost node ends the run."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(timeout=timedelta(seconds=job.cfg.dist.timeout))


def _cluster_environment():
    """The ranks' places come from the variables the launcher set (never SLURM's or torchrun's
    own, which describe the launchers, one per node, not the trainer ranks)."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    return LightningEnvironment()
