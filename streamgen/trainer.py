"""The body of one trainer rank: a spawned process that runs Lightning's fit on its source.

The launcher (`streamgen.launch`) spawns one per rank with a `TrainerSpec`; ranks form one
DDP group. Everything here runs after the checks: bad input never reaches a trainer.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from streamgen.checks import Job
from streamgen.config import to_dict
from streamgen.generator import GeneratorStats
from streamgen.queue import OwnerDied, SlotQueue, StreamClosed, avoid_named_semaphores

STOP_REASON = "stopping: the run was interrupted"


@dataclass(frozen=True)
class TrainerSpec:
    rank: int
    job: Job
    run_dir: str
    threads: int
    env: dict[str, str]


def trainer_main(spec: TrainerSpec, queue: SlotQueue, stats: GeneratorStats) -> None:
    """One trainer rank (a spawned process): Lightning fit on this rank's queue."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher owns shutdown
    avoid_named_semaphores()
    os.environ.update(spec.env)
    try:
        _fit(spec, queue, stats)
    except StreamClosed as e:
        if str(e) != STOP_REASON:
            print(f"\nstreamgen: the stream stopped: {e}", file=sys.stderr)
            raise SystemExit(1) from None
    except OwnerDied as e:
        print(f"\nstreamgen: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _fit(spec: TrainerSpec, queue: SlotQueue, stats: GeneratorStats) -> None:
    import lightning as L
    import torch

    cfg = spec.job.cfg
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.set_float32_matmul_precision("high")
    L.seed_everything(cfg.seed + spec.rank, verbose=False)
    model = build_model(spec)
    data = build_datamodule(spec, queue)
    logger = build_logger(spec)
    trainer = build_trainer(spec, logger, build_callbacks(spec, queue, stats))
    if trainer.is_global_zero:
        logger.experiment.add_text("config", f"```yaml\n{yaml.safe_dump(to_dict(cfg), sort_keys=False)}```", 0)
    trainer.fit(model, datamodule=data, ckpt_path=cfg.resume)


def build_model(spec: TrainerSpec):
    """The LightningModule: network, loss and optimiser settings from the config."""
    from streamgen.model import Classifier

    job, cfg, t = spec.job, spec.job.cfg, spec.job.cfg.train
    return Classifier(
        arch=t.arch,
        class_keys=job.plan.classes.keys,
        lr=t.lr * cfg.stream.batch_size * cfg.trainers / 256,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        max_steps=t.max_steps,
        label_smoothing=t.label_smoothing,
        class_fingerprint=job.plan.classes.fingerprint(),
    )


def build_datamodule(spec: TrainerSpec, queue: SlotQueue):
    """The source of training batches (the one place where stream or cache is chosen)."""
    from streamgen.stream import StreamDataModule

    job, t = spec.job, spec.job.cfg.train
    return StreamDataModule(
        queue,
        rank=spec.rank,
        world=spec.job.cfg.trainers,
        run_meta=job.run_meta,
        crop=t.crop,
        min_scale=t.min_scale,
        class_keys=job.plan.classes.keys,
        val_dir=t.val_dir,
        val_batch_size=t.val_batch_size,
        workers=t.workers,
        preview_every=t.preview_every,
        consumed_log=Path(spec.run_dir) / f"consumed-rank{spec.rank}.tsv",
    )


def build_logger(spec: TrainerSpec):
    from lightning.pytorch.loggers import TensorBoardLogger

    run_dir = Path(spec.run_dir)
    return TensorBoardLogger(
        save_dir=str(run_dir.parent.parent), name=run_dir.parent.name, version=run_dir.name, default_hp_metric=False
    )


def build_callbacks(spec: TrainerSpec, queue: SlotQueue, stats: GeneratorStats) -> list:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from streamgen.callbacks import StepProgressBar, StreamMonitor

    job, t = spec.job, spec.job.cfg.train
    return [
        StreamMonitor(queue, stats, job.plan, job.cfg.trainers, t.log_every),
        StepProgressBar(),
        LearningRateMonitor(logging_interval="step"),
        ModelCheckpoint(
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


def build_trainer(spec: TrainerSpec, logger, callbacks: list):
    import lightning as L

    job, t = spec.job, spec.job.cfg.train
    world = job.cfg.trainers
    precision = t.precision if t.precision != "auto" else ("bf16-mixed" if job.accelerator == "gpu" else "32-true")
    return L.Trainer(
        accelerator=job.accelerator,
        devices=job.trainer_devices,
        strategy="ddp" if world > 1 else "auto",
        max_steps=t.max_steps,
        max_epochs=-1,
        precision=precision,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=t.log_every,
        val_check_interval=t.val_every if t.val_dir else None,
        check_val_every_n_epoch=None,
        limit_val_batches=None if t.val_dir else 0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        enable_model_summary=spec.rank == 0,
    )
