"""``train.py``: check everything, then run generators, queues and trainer ranks until done.

Process layout (one node):

    launcher (this process: the supervisor; owns every process and all shared memory)
      |-- generator 0..N-1   spawned; cuda:0..N-1 (or CPU); write units into the queues
      `-- trainer rank 0..M-1 spawned; cuda:N..N+M-1 (or CPU); Lightning DDP, one queue each

The launcher checks all input first (config, classes, prompts, model, devices, memory, the
checkpoint to resume) and exits with status 2 and one line on the first problem, before any
process starts. Then it supervises: it restarts failed generators, and stops everything on
success, on a trainer's failure, on Ctrl-C or SIGTERM: queues closed (trainers stop at their
next batch), then every child joined or killed within seconds. The memory is anonymous, so
nothing is left in /dev/shm however the run ends.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from streamgen.classes import ClassSet, load_classes
from streamgen.config import RunConfig, parse_config, slots_per_rank, to_dict
from streamgen.errors import EXIT_USAGE, UsageError
from streamgen.generator import FAKE, GeneratorStats, WorkerSpec, check_attention
from streamgen.pipeline import resolve_model
from streamgen.plan import SamplePlan, UnitCursor, load_class_counts
from streamgen.prompts import PromptTemplate
from streamgen.queue import OwnerDied, SlotQueue, StreamClosed, avoid_named_semaphores, slot_nbytes
from streamgen.supervisor import SPAWN, GeneratorFailed, Supervisor

DESCRIPTION = (
    "Train a classifier from scratch on a live stream of Stable Diffusion images. "
    "Start from a config in configs/ and override keys with flags; watch with "
    "`tensorboard --logdir runs`."
)
STOP_REASON = "stopping: the run was interrupted"


@dataclass
class Job:
    """A fully checked run: what the launcher needs to start the processes."""

    cfg: RunConfig
    plan: SamplePlan  # its .classes is the run's class set
    model: str
    generator_devices: list[str]
    accelerator: str
    trainer_devices: list[int] | int
    cursors: list[UnitCursor]
    run_meta: dict[str, Any]
    slots: int


# -- checks -----------------------------------------------------------------------------------


def cuda_device_count() -> int:
    """GPUs on this node, asked of NVML so that CUDA is not initialised before spawning."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def assign_devices(generators: int, trainers: int) -> tuple[list[str], str, list[int] | int]:
    gpus = cuda_device_count()
    if gpus == 0:
        cores = os.cpu_count() or 1
        if trainers > cores:
            raise UsageError(
                f"--trainers {trainers}: this machine has no GPU and {cores} CPU cores; use at most {cores}"
            )
        return ["cpu"] * generators, "cpu", trainers
    if generators + trainers > gpus:
        raise UsageError(
            f"--generators {generators} + --trainers {trainers} need {generators + trainers} GPUs "
            f"(each process has its own); this node has {gpus}"
        )
    return [f"cuda:{i}" for i in range(generators)], "gpu", list(range(generators, generators + trainers))


def check_memory(needed: int) -> None:
    try:
        meminfo = Path("/proc/meminfo").read_text().split("\n")
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return
    if needed > 0.8 * available:
        raise UsageError(
            f"the queues need {needed / 2**30:.1f} GiB of shared memory but only {available / 2**30:.1f} GiB "
            "is available: lower --stream.slots, --stream.batch_size or --stream.resolution"
        )


def run_meta(cfg: RunConfig, classes: ClassSet) -> dict[str, Any]:
    """What a checkpoint must share with a run to resume it."""
    return {
        "classes": classes.fingerprint(),
        "class_spec": classes.spec,
        "seed": cfg.seed,
        "unit_size": cfg.stream.batch_size,
        "world": cfg.trainers,
    }


def load_resume_cursors(path: str, meta: dict[str, Any]) -> list[UnitCursor]:
    import torch

    from streamgen.stream import stream_state

    if not Path(path).is_file():
        raise UsageError(f"--resume {path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file at all
        raise UsageError(f"--resume {path}: not a readable checkpoint ({type(e).__name__})") from None
    state = stream_state(checkpoint) if isinstance(checkpoint, dict) else None
    if state is None:
        raise UsageError(f"--resume {path}: not a streamgen checkpoint (it holds no stream position)")
    if state["classes"] != meta["classes"]:
        raise UsageError(
            f"--resume {path}: the checkpoint was trained on another class set ({state['class_spec']}); "
            f"run with --classes {state['class_spec']}"
        )
    for key, flag in (("seed", "--seed"), ("unit_size", "--stream.batch_size"), ("world", "--trainers")):
        if state[key] != meta[key]:
            raise UsageError(
                f"--resume {path}: the checkpoint's stream has {flag} {state[key]}; resume with {flag} {state[key]}"
            )
    cursors = sorted((UnitCursor.from_state_dict(c) for c in state["cursors"]), key=lambda c: c.rank)
    if [c.rank for c in cursors] != list(range(meta["world"])):
        raise UsageError(
            f"--resume {path}: the checkpoint's stream position is incomplete (ranks {[c.rank for c in cursors]})"
        )
    return cursors


def prepare(cfg: RunConfig) -> Job:
    """Every check that can fail on user input; raises UsageError, starts nothing."""
    classes = load_classes(cfg.classes)
    counts = load_class_counts(cfg.class_counts, classes) if cfg.class_counts else None
    plan = SamplePlan(classes, PromptTemplate.parse(cfg.prompt), cfg.seed, counts)
    model = cfg.model if cfg.model == FAKE else resolve_model(cfg.model)
    check_attention(cfg.generator.attention)
    generator_devices, accelerator, trainer_devices = assign_devices(cfg.generators, cfg.trainers)
    slots = slots_per_rank(cfg)
    check_memory(cfg.trainers * slots * slot_nbytes(cfg.stream.batch_size, cfg.stream.resolution))
    meta = run_meta(cfg, classes)
    if cfg.resume:
        cursors = load_resume_cursors(cfg.resume, meta)
    else:
        cursors = [UnitCursor(r, cfg.trainers) for r in range(cfg.trainers)]
    return Job(cfg, plan, model, generator_devices, accelerator, trainer_devices, cursors, meta, slots)


# -- the trainer ranks ----------------------------------------------------------------------


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
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from streamgen.callbacks import StepProgressBar, StreamMonitor
    from streamgen.model import Classifier
    from streamgen.stream import StreamDataModule

    job, cfg, t = spec.job, spec.job.cfg, spec.job.cfg.train
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.set_float32_matmul_precision("high")
    L.seed_everything(cfg.seed + spec.rank, verbose=False)
    run_dir = Path(spec.run_dir)
    world = cfg.trainers
    model = Classifier(
        arch=t.arch,
        class_keys=job.plan.classes.keys,
        lr=t.lr * cfg.stream.batch_size * world / 256,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        max_steps=t.max_steps,
        label_smoothing=t.label_smoothing,
        class_fingerprint=job.plan.classes.fingerprint(),
    )
    data = StreamDataModule(
        queue,
        rank=spec.rank,
        world=world,
        run_meta=job.run_meta,
        crop=t.crop,
        min_scale=t.min_scale,
        class_keys=job.plan.classes.keys,
        val_dir=t.val_dir,
        val_batch_size=t.val_batch_size,
        workers=t.workers,
        preview_every=t.preview_every,
        consumed_log=run_dir / f"consumed-rank{spec.rank}.tsv",
    )
    logger = TensorBoardLogger(
        save_dir=str(run_dir.parent.parent), name=run_dir.parent.name, version=run_dir.name, default_hp_metric=False
    )
    callbacks = [
        StreamMonitor(queue, stats, job.plan, world, t.log_every),
        StepProgressBar(),
        LearningRateMonitor(logging_interval="step"),
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=t.checkpoint_every,
            monitor="step",
            mode="max",
            save_top_k=t.keep_checkpoints,
            save_last=True,
        ),
    ]
    precision = t.precision if t.precision != "auto" else ("bf16-mixed" if job.accelerator == "gpu" else "32-true")
    trainer = L.Trainer(
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
    if trainer.is_global_zero:
        logger.experiment.add_text("config", f"```yaml\n{yaml.safe_dump(to_dict(cfg), sort_keys=False)}```", 0)
    trainer.fit(model, datamodule=data, ckpt_path=cfg.resume)


# -- the launcher -----------------------------------------------------------------------------


def make_run_dir(out: str, name: str) -> Path:
    base = Path(out) / name
    base.mkdir(parents=True, exist_ok=True)
    versions = [int(p.name.split("_")[1]) for p in base.glob("version_*") if p.name.split("_")[1].isdigit()]
    run_dir = base / f"version_{max(versions, default=-1) + 1}"
    run_dir.mkdir()
    return run_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads_per_process(job: Job) -> tuple[int, int]:
    if job.accelerator == "gpu":
        return job.cfg.generator.threads, job.cfg.train.threads
    share = max(1, (os.cpu_count() or 1) // (job.cfg.generators + job.cfg.trainers))
    return job.cfg.generator.threads or share, job.cfg.train.threads or share


class _Terminate(Exception):
    pass


def _on_sigterm(signum, frame) -> None:
    raise _Terminate()


def log(message: str) -> None:
    print(f"streamgen: {message}", file=sys.stderr, flush=True)


def run(job: Job) -> int:
    cfg = job.cfg
    run_dir = make_run_dir(cfg.out, cfg.name)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log(f"run folder {run_dir}  (watch: tensorboard --logdir {cfg.out})")
    gen_threads, trainer_threads = _threads_per_process(job)
    worker = WorkerSpec(
        index=0,
        life=0,
        device="cpu",
        threads=gen_threads,
        model=job.model,
        cfg=cfg.generator,
        plan=job.plan,
        unit_size=cfg.stream.batch_size,
        out_resolution=cfg.stream.resolution,
    )
    env = {}
    if cfg.trainers > 1:
        env = {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "NODE_RANK": "0",
            "WORLD_SIZE": str(cfg.trainers),
        }
    supervisor = Supervisor(
        worker,
        job.generator_devices,
        job.cursors,
        job.slots,
        max_restarts=cfg.stream.max_restarts,
        restart_backoff=cfg.stream.restart_backoff,
        log=log,
    )
    previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    # Explicitly: a shell without job control starts background jobs with SIGINT ignored.
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    trainers: list = []
    status, reason = 1, STOP_REASON
    try:
        supervisor.start()
        log(f"{cfg.generators} generator(s) on {', '.join(sorted(set(job.generator_devices)))} loading {cfg.model}")
        for rank in range(cfg.trainers):
            rank_env = {**env, "LOCAL_RANK": str(rank)} if cfg.trainers > 1 else {}
            spec = TrainerSpec(rank, job, str(run_dir), trainer_threads, rank_env)
            p = SPAWN.Process(
                target=trainer_main,
                args=(spec, supervisor.queues[rank], supervisor.stats),
                name=f"streamgen-trainer{rank}",
            )
            p.start()
            trainers.append(p)
        status = _supervise(supervisor, trainers)
        reason = "the run is over"
    except GeneratorFailed as e:
        log(f"stopping: {str(e).splitlines()[0]}")
        _join(trainers, 10.0)  # they raise the generator's error from the closed queue
    except (KeyboardInterrupt, _Terminate):
        log("interrupted: stopping every process")
        status = 130
    finally:
        # Cleanup is bounded (seconds); a second Ctrl-C must not cut it short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        supervisor.close_queues(reason)  # trainers stop at their next batch
        _join(trainers, 4.0)
        supervisor.shutdown(reason, grace=2.0)
        signal.signal(signal.SIGINT, previous_sigint)
        signal.signal(signal.SIGTERM, previous_sigterm)
    if status == 0:
        log(f"done: {cfg.train.max_steps} steps; checkpoints in {run_dir / 'checkpoints'}")
    return status


def _supervise(supervisor: Supervisor, trainers: list) -> int:
    """Serve generators until every trainer has exited; 0 if all succeeded."""
    while True:
        supervisor.poll(1.0, extra=[p.sentinel for p in trainers])
        codes = [p.exitcode for p in trainers]
        if any(c not in (None, 0) for c in codes):
            bad = next(i for i, c in enumerate(codes) if c not in (None, 0))
            log(f"trainer rank {bad} failed (exit status {codes[bad]}): stopping")
            supervisor.close_queues(f"trainer rank {bad} failed")
            return 1
        if all(c == 0 for c in codes):
            return 0


def _join(processes: list, grace: float) -> None:
    deadline = time.monotonic() + grace
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join(5)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv, prog="train.py", description=DESCRIPTION)  # bad flags: exit 2
        job = prepare(cfg)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return run(job)
