"""Every check that can fail on user input, done in the launcher before anything starts.

`prepare` turns a parsed `RunConfig` into a `Job`: the class set, the sample plan, the model
folder, the devices, the queue size and the stream position to resume from. It raises
`UsageError` (one line, exit 2) on the first problem and starts nothing: no process, no
folder, no CUDA context (GPUs are counted through NVML).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamgen.classes import ClassSet, load_classes
from streamgen.config import RunConfig, slots_per_rank
from streamgen.errors import UsageError
from streamgen.generator import FAKE, check_attention
from streamgen.pipeline import resolve_model
from streamgen.plan import SamplePlan, UnitCursor, load_class_counts
from streamgen.prompts import PromptTemplate
from streamgen.queue import slot_nbytes


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
