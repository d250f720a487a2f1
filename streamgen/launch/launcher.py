"""``train.py``: check everything, then run generators, queues and trainer ranks until done.

Process layout (one node):

    launcher (this process: the supervisor; owns every process and all shared memory)
      |-- generator 0..N-1   spawned; cuda:0..N-1 (or CPU); write units into the queues
      `-- trainer rank 0..M-1 spawned; cuda:N..N+M-1 (or CPU); Lightning DDP, one queue each

The launcher checks all input first (config, classes, prompts, model, devices, memory, the
checkpoint to resume) and exits with status 2 and one line on the first problem, before any
process starts. Then it supervises: it restarts failed generators, and stops everything on
success or on a trainer's failure: queues closed (trainers stop at their next batch), then
every child joined or killed within seconds. Ctrl-C or SIGTERM (a cluster's pre-emption
notice) is a stop request (`stop_and_save`): the trainers finish their step and write
``last.ckpt`` while the generators keep serving them, within ``--train.stop_grace`` seconds;
a second Ctrl-C, or a SIGTERM seconds after the first, stops at once. A signal sent to the whole
process group (a terminal's Ctrl-C, GNU ``timeout``, SLURM) reaches the children too: they ignore
it (the launcher coordinates the stop), and copies of one SIGTERM are one interruption. The
same stop request ends a run whose generators were all retired (`streamgen.stream.supervisor`:
hung or failing too often); a trainer rank that makes no progress (`streamgen.stream.heartbeat`)
stops the run, the other ranks saving if they can.
The memory is anonymous, so nothing is left in /dev/shm however the run ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import sys
import time
from multiprocessing import resource_tracker
from multiprocessing.connection import wait
from pathlib import Path

import yaml

from streamgen.cache.build import CacheBuildFailed
from streamgen.config import parse_config, to_dict
from streamgen.errors import EXIT_USAGE, UsageError
from streamgen.launch import DESCRIPTION
from streamgen.launch.checks import Job, check_budget, prepare
from streamgen.launch.nodes import NodeGroup, ddp_client_env, dist_secret, serve_store
from streamgen.launch.rank import STOP_REASON, TrainerSpec, trainer_main
from streamgen.launch.resume import check_resume_settings, resumed_position, run_folder_of
from streamgen.stream.control import StopControl
from streamgen.stream.heartbeat import Heartbeats, TrainerStalled, TrainerWatch
from streamgen.stream.supervisor import SPAWN, GeneratorFailed, Supervisor
from streamgen.stream.worker import WorkerSpec

# -- the launcher -----------------------------------------------------------------------------


def make_run_dir(out: str, name: str) -> Path:
    """``out/name/version_K``, K one past the highest; launchers starting at once get distinct K."""
    base = Path(out) / name
    base.mkdir(parents=True, exist_ok=True)
    while True:
        versions = [int(p.name.split("_")[1]) for p in base.glob("version_*") if p.name.split("_")[1].isdigit()]
        run_dir = base / f"version_{max(versions, default=-1) + 1}"
        try:
            run_dir.mkdir()  # exclusive: exactly one launcher creates a given version
            return run_dir
        except FileExistsError:
            continue  # another launcher took it first: look again


_LOCAL_DDP_STORE = None  # a single node's DDP store, served by this launcher on 127.0.0.1


def ddp_env(job: Job) -> dict[str, str]:
    """Where the trainer ranks meet: the DDP store this launcher serves on 127.0.0.1 (one node),
    or node 0's, which its launcher serves on master_addr (`NodeGroup.join`); every rank is a
    client of it, so no trainer listens on every interface."""
    global _LOCAL_DDP_STORE
    if job.world == 1:
        return {}
    p = job.placement
    if p.nodes > 1:
        env = ddp_client_env(p.master_addr, p.master_port, loopback=False)
    else:
        _LOCAL_DDP_STORE = serve_store("127.0.0.1", 0, job.cfg.dist.timeout)
        env = ddp_client_env("127.0.0.1", _LOCAL_DDP_STORE.port, loopback=True)
    return {**env, "NODE_RANK": str(p.node_rank), "WORLD_SIZE": str(job.world)}


def _run_dir(job: Job, group: NodeGroup | None) -> Path:
    """This run's folder: made by node 0 (the others use the same path, shared or not). A resumed
    run continues in the folder of its checkpoint (same TensorBoard version: one set of curves)."""
    resumed = run_folder_of(job.cfg.resume) if job.cfg.resume else None
    if group is None:
        return resumed or make_run_dir(job.cfg.out, job.cfg.name)
    if group.node_rank == 0:
        return Path(group.share("run_dir", str(resumed or make_run_dir(job.cfg.out, job.cfg.name))))
    run_dir = Path(group.share("run_dir"))  # authenticated: only a node of this run names it
    run_dir.mkdir(parents=True, exist_ok=True)  # a node-local disk: the same layout there
    return run_dir


def join_nodes(job: Job) -> NodeGroup | None:
    """Several nodes: meet the other launchers and check they run the same config (one line, exit 2)."""
    if job.placement.nodes == 1:
        return None
    group = NodeGroup(job.placement, job.cfg.dist.timeout, dist_secret(job.cfg.out))  # no secret: refused
    log(f"node {job.placement.node_rank} of {job.placement.nodes}: joining node 0 at {job.placement.master_addr}")
    group.join(to_dict(job.cfg))
    return group


def _threads_per_process(job: Job) -> tuple[int, int]:
    if job.accelerator == "gpu":
        return job.cfg.generator.threads, job.cfg.train.threads
    share = max(1, (os.cpu_count() or 1) // (job.cfg.generators + job.cfg.trainers))
    return job.cfg.generator.threads or share, job.cfg.train.threads or share


def resolved_config(job: Job) -> dict:
    """The config as it runs, every ``auto`` and default decided: ``config.yaml`` in the run
    folder and the dashboard's config text and hyper-parameters. What stays null was not
    asked for (no resume, no val_dir, no cache on a stream run)."""
    import torch

    from streamgen.config import local_crop_size
    from streamgen.generate.diffusion import compiles, resolve_dtype
    from streamgen.generate.shapes import PROCEDURAL
    from streamgen.launch.rank import resolve_precision

    cfg = to_dict(job.cfg)
    g, t = cfg["generator"], cfg["train"]
    device = torch.device(job.generator_devices[0])  # naming a device does not initialise CUDA
    gen_threads, trainer_threads = _threads_per_process(job)
    g["dtype"] = str(resolve_dtype(g["dtype"], device)).removeprefix("torch.")
    compiled = job.model not in PROCEDURAL and compiles(job.cfg.generator, device.type)
    g["compile"] = "on" if compiled else "off"
    g["compile_vae"] = compiled and g["compile_vae"]
    g["threads"] = gen_threads or torch.get_num_threads()  # 0 on GPU: torch's default
    t["threads"] = trainer_threads or torch.get_num_threads()
    t["precision"] = resolve_precision(job)
    if "local_crop" in t:
        t["local_crop"] = local_crop_size(job.cfg.train)
    cfg["stream"]["slots"] = job.slots
    replay = job.replay()
    cfg["stream"]["buffer"] = replay.capacity if replay is not None else None  # None: no replay buffer
    cfg["model"] = job.model
    if job.model not in PROCEDURAL:  # FLOPs per image, counted from the model's config (streamgen.generate.cost)
        from streamgen.generate.cost import image_cost, paper_cost

        cost = image_cost(job.cfg.generator, job.model)
        paper = paper_cost(job.model)["tflop_per_image"]
        cfg["cost"] = {**cost, "paper_tflop_per_image": paper, "ratio_to_paper": cost["tflop_per_image"] / paper}
    if "dist" in cfg:
        p = job.placement
        cfg["dist"].update(nodes=p.nodes, node_rank=p.node_rank, master_addr=p.master_addr, master_port=p.master_port)
    return cfg


def write_atomically(path: Path, text: str) -> None:
    """Temp file in the same folder, flushed and synced, then renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # unique: launchers may share the folder
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Terminate(Exception):
    pass


class _Interrupts:
    """The launcher's handler of SIGINT and SIGTERM. The first asks for a stop with a checkpoint;
    the second stops at once and ignores any further one (the cleanup, seconds, must not be cut
    short: Ctrl-C pressed three times is still one clean stop).

    A SIGTERM within ``COPY_WINDOW`` seconds of the first signal is a copy of it, not a second
    interruption: one pre-emption reaches the launcher more than once when it is sent to the whole
    process group as well as to the launcher (GNU ``timeout`` signals its command, then the
    command's group; ``scancel`` and SLURM's pre-emption signal every process of the job). A second
    SIGINT is always a second Ctrl-C: a terminal sends one per key press.
    """

    COPY_WINDOW = 2.0

    def __init__(self) -> None:
        self.count = 0
        self.first_at = 0.0

    def __call__(self, signum, frame) -> None:
        now = time.monotonic()
        if self.count == 1 and signum == signal.SIGTERM and now - self.first_at < self.COPY_WINDOW:
            return  # the same interruption, delivered again: the stop it asked for goes on
        self.count += 1
        if self.count == 1:
            self.first_at = now
        if self.count >= 2:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt() if signum == signal.SIGINT else _Terminate()


def log(message: str) -> None:
    print(f"streamgen: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _children_without_interrupts():
    """Processes spawned in this block start with SIGINT and SIGTERM blocked, and keep them so.

    A Ctrl-C at the terminal goes to every process of the foreground group, and a cluster's
    SIGTERM to every process of the job: the launcher alone must see them (it turns them into
    a stop request), and a child importing torch must not print a KeyboardInterrupt traceback.
    In the launcher a signal that arrives meanwhile is held back and raised after the block, so
    that it never interrupts a spawn half-way (a process object made but not started).
    """
    signals = (signal.SIGINT, signal.SIGTERM)
    # Started now, not by the first spawn below: starting it unblocks these signals again.
    resource_tracker.ensure_running()
    held: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in signals}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if held:
            handlers[held[0]](held[0], None)  # raises as the launcher's own handler does


def run(job: Job, group: NodeGroup | None = None, argv: list[str] | None = None) -> int:
    """Run the job on this node; ``group`` joins it to the other nodes' launchers (several nodes);
    ``argv`` (the command line) gives the ``--resume`` command printed after an interruption."""
    cfg = job.cfg
    interrupts = _Interrupts()
    previous_sigterm = signal.signal(signal.SIGTERM, interrupts)
    # Explicitly: a shell without job control starts background jobs with SIGINT ignored.
    previous_sigint = signal.signal(signal.SIGINT, interrupts)
    control = StopControl()  # the trainers' stop request (Ctrl-C, SIGTERM): stop, save, exit
    beats = Heartbeats(cfg.trainers)  # each rank's last sign of progress, for the trainer watchdog
    supervisor: Supervisor | None = None
    trainers: list = []
    run_dir: Path | None = None
    status, reason = 1, STOP_REASON
    try:
        run_dir = _run_dir(job, group)
        if cfg.train.val_shapes:
            _render_val_shapes(job, run_dir)
        if cfg.source == "cache":
            _build_cache_first(job, group)  # with the run's generators; then training needs none
        supervisor = _build_supervisor(job) if cfg.source == "stream" else NoGenerators()
        _start(job, run_dir, supervisor, control, trainers, beats)
        watch = TrainerWatch(beats, cfg.train.hang_timeout, cfg.stream.startup_timeout, job.first_rank)
        status = _supervise(supervisor, trainers, watch, group, job.first_rank)
        reason = "the run is over"
    except CacheBuildFailed as e:  # the nodes building the cache together lost one: nothing to save yet
        log(f"{e}: stopping")
    except GeneratorFailed as e:
        # Every generator was retired: no data will come. The trainers stop and save (the stop
        # request also ends their wait for data), so --resume loses nothing.
        log(f"stopping: {e}")
        stop_and_save(supervisor, trainers, control, "no generator left", cfg.train.stop_grace)
    except TrainerStalled as e:
        log(f"{e}: stopping the run")
        others = [p for row, p in enumerate(trainers) if row != e.row]  # they save if they can
        stop_and_save(
            supervisor, others, control, f"trainer rank {job.first_rank + e.row} stalled", cfg.train.stop_grace
        )
    except (KeyboardInterrupt, _Terminate):
        status = 130
        if supervisor is None or not trainers:
            log("interrupted: stopping every process")
        else:
            try:
                stop_and_save(supervisor, trainers, control, "interrupted", cfg.train.stop_grace)
            except (KeyboardInterrupt, _Terminate):
                log("interrupted again: stopping at once, without a checkpoint")
    finally:
        # Cleanup is bounded (seconds); a further Ctrl-C must not cut it short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if supervisor is not None:
            supervisor.close_queues(reason)  # trainers stop at their next batch
        _join(trainers, 4.0)
        if run_dir is not None:
            _remove_partial_checkpoints(run_dir / "checkpoints")
        if supervisor is not None:
            supervisor.shutdown(reason, grace=2.0)
        control.close()
        beats.close()
        signal.signal(signal.SIGINT, previous_sigint)
        signal.signal(signal.SIGTERM, previous_sigterm)
    if status != 0 and run_dir is not None and (run_dir / "checkpoints" / "last.ckpt").is_file():
        log(f"to resume: {resume_command(argv if argv is not None else sys.argv[1:], run_dir)}")
    return status


def say_truncated_prompts(job: Job) -> None:
    """One line when class prompts are longer than CLIP reads: SD receives them cut (the preview
    table of the dashboard shows what it receives); the per-batch warnings are silenced."""
    from streamgen.generate.tokens import count_truncated, load_tokenizer

    cut, total = count_truncated(load_tokenizer(job.model), job.plan.template, job.plan.classes)
    if cut:
        log(
            f"{cut} of {total} class prompts (--prompt {job.cfg.prompt}) are longer than CLIP's 77 tokens: "
            "Stable Diffusion receives them truncated (the dashboard's stream/prompts table shows what it receives)"
        )


def resume_command(argv: list[str], run_dir: Path) -> str:
    """The command line that resumes this run in its own folder: the same flags, ``--resume RUN_DIR``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return shlex.join(["python", "train.py", *kept, "--resume", str(run_dir)])


def _render_val_shapes(job: Job, run_dir: Path) -> None:
    """--train.val_shapes N: the shapes benchmark's held-out set for this run's classes, rendered
    into the run folder at the stream resolution (a second), then validated on as a val_dir."""
    from streamgen.generate.shapes import render_val_set

    cfg = job.cfg
    folder = render_val_set(run_dir / "val_shapes", job.plan.classes.keys, cfg.train.val_shapes, cfg.stream.resolution)
    cfg.train.val_dir = str(folder)
    log(f"validation: {cfg.train.val_shapes} held-out shapes images per class in {folder}")


class NoGenerators:
    """What a cache run supervises while it trains: no generator, no queue; only the trainers."""

    queues: list = []
    stats = None

    def start(self) -> None:
        pass

    def poll(self, timeout: float = 1.0, extra: list | None = None) -> list:
        return wait(extra or [], timeout)

    def close_queues(self, reason: str) -> None:
        pass

    def shutdown(self, reason: str = "", grace: float = 0.0) -> None:
        pass


def _build_cache_first(job: Job, group: NodeGroup | None = None) -> None:
    """--source cache: make the missing shards (resuming a killed build) with the run's generators;
    on several nodes, this node's share of them into the shared cache.dir (`build_cache`)."""
    from streamgen.cache.build import build_cache, build_slots, supervision

    cfg = job.cfg
    if job.cache.complete:
        log(f"training from the cache in {cfg.cache.dir} ({job.cache.layout.images} images, complete)")
        return
    build_cache(
        job.cache,
        _worker_spec(job),
        job.generator_devices,
        build_slots(cfg),  # one queue, read by the disk writer
        log=log,
        spawn_guard=_children_without_interrupts,
        nodes=job.placement.nodes,
        node_rank=job.placement.node_rank,
        patience=cfg.dist.timeout,
        lost_peer=group.lost_peer if group is not None else None,
        **supervision(cfg),
    )
    try:  # the build's cost is known now: a budget it used up leaves no step to train
        check_budget(cfg, dataclasses.replace(job.cache, complete=True))
    except UsageError as e:
        raise CacheBuildFailed(f"{e} (the cache in {cfg.cache.dir} is complete and kept for another run)") from None
    log(f"the cache in {cfg.cache.dir} is complete; training from it with {cfg.trainers} trainer(s), no generators")


def _worker_spec(job: Job) -> WorkerSpec:
    cfg = job.cfg
    gen_threads, _ = _threads_per_process(job)
    return WorkerSpec(
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


def _build_supervisor(job: Job) -> Supervisor:
    """The generators' owner (nothing started yet)."""
    cfg = job.cfg
    return Supervisor(
        _worker_spec(job),
        job.generator_devices,
        job.cursors,
        job.slots,
        max_restarts=cfg.stream.max_restarts,
        restart_backoff=cfg.stream.restart_backoff,
        restart_window=cfg.stream.restart_window,
        hang_timeout=cfg.stream.hang_timeout,
        startup_timeout=cfg.stream.startup_timeout,
        log=log,
        spawn_guard=_children_without_interrupts,
    )


def _start(
    job: Job, run_dir: Path, supervisor: Supervisor, control: StopControl, trainers: list, beats: Heartbeats
) -> None:
    """Write the run's config, start the generators and the trainer ranks (appended to
    ``trainers`` as each starts, so that the caller stops those that did)."""
    cfg = job.cfg
    if job.placement.node_rank == 0:  # the run's config: the other nodes run the same (checked at start)
        write_atomically(run_dir / "config.yaml", yaml.safe_dump(resolved_config(job), sort_keys=False))
    log(f"run folder {run_dir}  (watch: tensorboard --logdir {cfg.out}; the config text links the pinned view)")
    _, trainer_threads = _threads_per_process(job)
    env = ddp_env(job)
    generators_since = time.monotonic()  # devices are charged from their spawn (streamgen.train.compute)
    with _children_without_interrupts():
        supervisor.start()
    if cfg.source == "stream":
        log(f"{cfg.generators} generator(s) on {', '.join(sorted(set(job.generator_devices)))} loading {cfg.model}")
    held_since = (generators_since, time.monotonic())  # the trainers' devices from their spawn, just below
    for rank in range(cfg.trainers):
        rank_env = {**env, "LOCAL_RANK": str(rank)} if env else {}
        spec = TrainerSpec(
            job.first_rank + rank, job, str(run_dir), trainer_threads, rank_env, control, beats.pulse(rank), held_since
        )
        p = SPAWN.Process(
            target=trainer_main,
            args=(spec, supervisor.queues[rank] if supervisor.queues else None, supervisor.stats),
            name=f"streamgen-trainer{rank}",
        )
        with _children_without_interrupts():
            p.start()
        trainers.append(p)


def stop_and_save(supervisor: Supervisor, trainers: list, control: StopControl, reason: str, grace: float) -> bool:
    """The one way to stop a run with a checkpoint: every trainer rank finishes its step, writes
    ``last.ckpt`` and exits. Generators keep being served meanwhile (a rank waiting for its
    batch needs it to finish the step). Waits at most ``grace`` seconds; True if every trainer
    exited in time. A Ctrl-C or SIGTERM meanwhile raises out of it: the caller stops at once."""
    if control.request(reason):
        log(
            f"{reason}: the trainers finish their step and write last.ckpt (up to {grace:.0f} s; "
            "Ctrl-C again stops at once, without a checkpoint)"
        )
    deadline = time.monotonic() + grace
    serving = True
    while any(p.is_alive() for p in trainers):
        left = deadline - time.monotonic()
        if left <= 0:
            log(f"the trainers did not stop within {grace:.0f} s (--train.stop_grace): stopping them")
            return False
        sentinels = [p.sentinel for p in trainers if p.is_alive()]
        if not serving:
            wait(sentinels, min(left, 1.0))
            continue
        try:
            supervisor.poll(min(left, 1.0), extra=sentinels)
        except GeneratorFailed:
            serving = False  # no more data: ranks waiting for it see the stop request and end
    return True


def _remove_partial_checkpoints(folder: Path) -> None:
    """Temporary files of checkpoints whose writer was killed (a second Ctrl-C): never a
    checkpoint (see streamgen.train.checkpoint), only disk space, once every trainer is gone."""
    for path in folder.glob(".*.partial"):
        path.unlink(missing_ok=True)


def _supervise(
    supervisor: Supervisor, trainers: list, watch: TrainerWatch, group: NodeGroup | None = None, first_rank: int = 0
) -> int:
    """Serve generators until every trainer has exited; 0 if all succeeded, 1 if a trainer failed
    or another node was lost. Raises `GeneratorFailed` when no generator is left, `TrainerStalled`
    when a rank stops progressing."""
    while True:
        supervisor.poll(1.0, extra=[p.sentinel for p in trainers])
        watch.check()
        codes = [p.exitcode for p in trainers]
        if any(c not in (None, 0) for c in codes):
            bad = next(i for i, c in enumerate(codes) if c not in (None, 0))
            message = f"trainer rank {first_rank + bad} failed (exit status {codes[bad]})"
            lost = group.name_the_lost_peer() if group is not None else None
            if lost is not None:  # the rank failed because another node went: say which
                message = f"{lost}; {message}"
            log(f"{message}: stopping")
            supervisor.close_queues(message)
            if group is not None:
                group.report_failure(message)
            return 1
        if all(c == 0 for c in codes):
            if group is not None:
                group.finish()
            return 0
        lost = group.lost_peer() if group is not None else None
        if lost is not None:
            log(f"{lost}: stopping this node")  # its trainers cannot go on without the lost ranks
            supervisor.close_queues(lost)
            return 1


def _join(processes: list, grace: float) -> None:
    deadline = time.monotonic() + grace
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join(5)


def warn_about_the_budget(job: Job) -> str | None:
    """Say at start when --train.budget_gpu_hours will stop the run before its LR schedule ends.

    Only on GPUs: the rates the estimate assumes (`streamgen.train.budget`) are GPUs'."""
    from streamgen.train.budget import schedule_warning

    if job.accelerator != "gpu":
        return None
    images = job.cache.layout.images if job.cache is not None else None
    warning = schedule_warning(job.cfg, job.cfg.generators * job.placement.nodes, job.world, images)
    if warning:
        log(f"warning: {warning}")
    return warning


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv, prog="train.py", description=DESCRIPTION)  # bad flags: exit 2
        job = prepare(cfg)
        say_truncated_prompts(job)
        if cfg.resume:
            changes = check_resume_settings(cfg.resume, resolved_config(job))
            log(f"resuming {cfg.resume} at {resumed_position(cfg.resume)}")
            if changes:
                log(f"changed since the checkpoint's run: {'; '.join(changes)}")
        group = join_nodes(job)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("train.py: interrupted while checking the input; nothing was started", file=sys.stderr)
        return 130
    warn_about_the_budget(job)
    if group is None:
        return run(job, argv=argv)
    try:
        status = run(job, group, argv)
    except BaseException as e:
        group.report_failure(f"its launcher failed ({type(e).__name__}: {e})")
        raise
    if status != 0:
        group.report_failure(f"its launcher stopped with status {status}")
    return status
