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
from pathlib import Path

import yaml

from streamgen.checks import Job, prepare
from streamgen.config import parse_config, to_dict
from streamgen.errors import EXIT_USAGE, UsageError
from streamgen.generator import WorkerSpec
from streamgen.supervisor import SPAWN, GeneratorFailed, Supervisor
from streamgen.trainer import STOP_REASON, TrainerSpec, trainer_main

DESCRIPTION = (
    "Train a classifier from scratch on a live stream of Stable Diffusion images. "
    "Start from a config in configs/ and override keys with flags; watch with "
    "`tensorboard --logdir runs`."
)


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
