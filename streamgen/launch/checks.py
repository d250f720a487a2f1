"""Every check that can fail on user input, done in the launcher before anything starts.

`prepare` turns a parsed `RunConfig` into a `Job`: the class set, the sample plan, the model
folder, the devices, the queue size and the stream position to resume from. It raises
`UsageError` (one line, exit 2) on the first problem and starts nothing: no process, no
folder, no CUDA context (GPUs are counted through NVML).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamgen.cache.layout import CacheSpec
from streamgen.config import RunConfig, TrainConfig, replay_buffer, reuse_of, slots_per_rank
from streamgen.errors import UsageError
from streamgen.evaluate.benchmarks import check_folder
from streamgen.evaluate.probe import check_probe_arch
from streamgen.evaluate.transfer import check_probes
from streamgen.generate.diffusion import check_generator
from streamgen.generate.fake import FAKE
from streamgen.generate.pipeline import resolve_model
from streamgen.generate.shapes import PROCEDURAL, check_class_count, check_procedural, check_val_set
from streamgen.launch.cache_checks import check_cache_run
from streamgen.launch.nodes import DEFAULT_PORT, Placement, resolve_placement
from streamgen.launch.resume import read_checkpoint, resolve_resume
from streamgen.plan.classes import ClassSet, load_classes
from streamgen.plan.prompts import PromptTemplate
from streamgen.plan.samples import SamplePlan, UnitCursor, load_class_counts
from streamgen.stream.queue import slot_nbytes
from streamgen.train.datamodule import SourceSpec
from streamgen.train.replay import ReplaySettings, sample_bytes


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
    placement: Placement = Placement(1, 0, "127.0.0.1", DEFAULT_PORT, "single")  # this node's place in the run
    cache: CacheSpec | None = None  # --source cache: the checked cache (layout, fingerprint, complete?)
    steps_per_epoch: int | None = None  # --source cache: batches per rank per epoch; None for the stream
    replay_on_device: bool = False  # --stream.reuse K > 1 or auto: the buffer fits the trainer GPU's memory

    @property
    def world(self) -> int:
        """Trainer ranks over all nodes: the DDP world, and the stride of each rank's units."""
        return self.placement.nodes * self.cfg.trainers

    @property
    def first_rank(self) -> int:
        """Global rank of this node's local trainer 0."""
        return self.placement.node_rank * self.cfg.trainers

    def source_spec(self) -> SourceSpec:
        """What a trainer rank's source needs (`streamgen.train.source.make_datamodule`)."""
        layout = self.cache.layout if self.cache is not None else None
        return SourceSpec(
            self.cfg,
            self.world,
            self.run_meta,
            pin=self.accelerator == "gpu",
            cache_layout=layout,
            classes=len(self.plan.classes),
            replay=self.replay(),
        )

    def replay(self) -> ReplaySettings | None:
        """The replay buffer's settings (--stream.reuse other than 1), or None for the plain stream."""
        cfg = self.cfg
        reuse = reuse_of(cfg)
        if reuse == 1 or cfg.source != "stream":
            return None
        return ReplaySettings(
            reuse=reuse,
            capacity=replay_buffer(cfg),
            max_steps=cfg.train.max_steps,
            seed=cfg.seed,
            on_device=self.replay_on_device,
            resume_dir=str(Path(cfg.resume).parent) if cfg.resume else None,
            keep=cfg.train.keep_checkpoints,
        )


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


REPLAY_GPU_SHARE = 0.25  # a replay buffer goes on the trainer's GPU if it takes at most this share of its memory


def gpu_memory_bytes() -> int | None:
    """The smallest GPU memory on this node, asked of NVML (CUDA must not start before spawning)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        sizes = [
            int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total)
            for i in range(pynvml.nvmlDeviceGetCount())
        ]
    except Exception:
        return None
    return min(sizes) if sizes else None


def host_memory_available() -> int | None:
    try:
        meminfo = Path("/proc/meminfo").read_text().split("\n")
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_replay_memory(cfg: RunConfig, accelerator: str, queue_bytes: int) -> bool:
    """Where each rank's replay buffer goes: True for the trainer's GPU (at most a quarter of its
    memory), False for host memory; a UsageError if it fits neither."""
    if reuse_of(cfg) == 1 or cfg.source != "stream":
        return False
    samples = replay_buffer(cfg)
    needed = samples * sample_bytes(cfg.stream.resolution)
    what = f"--stream.buffer {samples} samples at {cfg.stream.resolution} px need {needed / 2**30:.2f} GiB per rank"
    if accelerator == "gpu":
        gpu = gpu_memory_bytes()
        if gpu is not None and needed <= REPLAY_GPU_SHARE * gpu:
            return True
    host = host_memory_available()
    if host is not None and cfg.trainers * needed + queue_bytes > 0.8 * host:
        where = "a quarter of a trainer GPU's memory nor in " if accelerator == "gpu" else ""
        raise UsageError(
            f"{what} ({cfg.trainers * needed / 2**30:.2f} GiB for {cfg.trainers} rank(s)), which fits neither in "
            f"{where}the {host / 2**30:.1f} GiB of host memory available (with the queues): lower --stream.buffer"
        )
    return False


def check_resume_replay(path: str, cfg: RunConfig, positions: list[dict[str, Any]]) -> None:
    """A resumed run replays as the checkpoint's did, and the checkpoint's replay sidecars exist."""
    reuse = reuse_of(cfg)
    label = "auto" if reuse is None else str(reuse)
    saved = {str((p.get("replay") or {}).get("reuse", "1")) for p in positions}
    if saved != {label}:
        theirs = ", ".join(sorted(saved))
        raise UsageError(f"--resume {path}: the checkpoint was trained with --stream.reuse {theirs}; resume with it")
    if reuse == 1:
        return
    for p in positions:
        info = p["replay"]
        if info.get("buffer") != replay_buffer(cfg):
            raise UsageError(
                f"--resume {path}: the checkpoint's replay buffer holds {info.get('buffer')} samples per rank; "
                f"resume with --stream.buffer {info.get('buffer')}"
            )
        if reuse is not None and info.get("max_steps") != cfg.train.max_steps:
            raise UsageError(
                f"--resume {path}: --stream.reuse {reuse} plans every sample's uses over --train.max_steps "
                f"{info.get('max_steps')}; resume with --train.max_steps {info.get('max_steps')}"
            )
        sidecar = Path(path).parent / "replay" / str(info.get("sidecar"))
        if not sidecar.is_file():
            raise UsageError(
                f"--resume {path}: its replay buffer {sidecar} is missing (it is written beside the checkpoint): "
                "copy the checkpoints folder whole"
            )


def run_meta(cfg: RunConfig, classes: ClassSet, nodes: int = 1) -> dict[str, Any]:
    """What a checkpoint must share with a run to resume it."""
    return {
        "classes": classes.fingerprint(),
        "class_spec": classes.spec,
        "seed": cfg.seed,
        "unit_size": cfg.stream.batch_size,
        "world": cfg.trainers * nodes,
    }


# Lightning's accepted precisions (lightning.fabric.plugins.precision.precision._PRECISION_INPUT),
# spelled out so that the launcher need not import Lightning to check one (tests/test_checks.py
# compares them), plus streamgen's 'auto'.
PRECISIONS = (
    "auto",
    "transformer-engine",
    "transformer-engine-float16",
    "16-true",
    "16-mixed",
    "bf16-true",
    "bf16-mixed",
    "32-true",
    "64-true",
    "64",
    "32",
    "16",
    "bf16",
)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(
            f"--train.precision {precision!r} is not a Lightning precision: use auto, bf16-mixed, 16-mixed or 32-true "
            f"(all: {', '.join(PRECISIONS)})"
        )
    if precision.startswith("transformer-engine") and importlib.util.find_spec("transformer_engine") is None:
        raise UsageError(f"--train.precision {precision} needs NVIDIA's transformer_engine package, not installed here")


def check_arch(arch: str) -> None:
    """A torchvision classification model (built from scratch by `streamgen.train.model`)."""
    import torchvision.models

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(
            f"--train.arch {arch!r} is not a torchvision classification model{hint}; "
            "see torchvision.models.list_models(module=torchvision.models)"
        )


def check_recipe(train: TrainConfig, accelerator: str, world: int = 1, batch: int = 1) -> None:
    """The training recipe fits the network, the devices and the DDP world of ``world`` ranks of
    ``batch`` images each (the values alone: config.validate)."""
    if train.sync_batchnorm and accelerator != "gpu" and world > 1:  # one rank: plain BatchNorm, anywhere
        raise UsageError("--train.sync_batchnorm needs GPUs (torch's SyncBatchNorm does not run on CPU): leave it off")
    if train.head == "trex-ocm" and train.memory_size < world * batch:
        raise UsageError(
            f"--train.memory_size {train.memory_size} is smaller than one global batch ({world} rank(s) x {batch} "
            f"images): the memory would drop part of every batch; use at least {world * batch} (t-ReX: 8192)"
        )
    if train.head != "linear":
        import torch

        from streamgen.train.model import build_network, classifier_path

        with torch.device("meta"):  # the layer structure only, no memory
            network = build_network(train.arch, 2)
        try:
            classifier_path(network)
        except ValueError:
            raise UsageError(
                f"--train.head {train.head} replaces the final linear layer, and --train.arch {train.arch} has none: "
                "use --train.head linear or another arch"
            ) from None


_COMPONENT_FILES = {"scheduler": "scheduler_config.json", "tokenizer": None}  # default: config.json


def check_model_components(folder: str) -> None:
    """Each component the pipeline's model_index.json names has its sub-folder with its config
    (a half-finished download holds model_index.json alone, and fails minutes later)."""
    root = Path(folder)
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError):
        return  # resolve_model has judged the index itself
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue  # metadata, or an optional component left out (safety_checker: null)
        sub = root / name
        wanted = _COMPONENT_FILES.get(name, "config.json")
        if not sub.is_dir() or (wanted and not (sub / wanted).is_file()) or not any(sub.iterdir()):
            what = f"{name}/{wanted}" if wanted else f"{name}/"
            raise UsageError(
                f"model folder {root} has no {what}: the download looks incomplete; download the whole "
                "pipeline again (huggingface-cli download ORG/NAME)"
            )


def check_run_folder(out: str, name: str) -> None:
    """``--out/--name`` can be created and written; checked without creating anything there."""
    target = Path(out) / name
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a folder; choose another --out")
    try:  # access() says yes to root on read-only or virtual filesystems (/proc): try for real
        os.rmdir(tempfile.mkdtemp(prefix=".streamgen-write-test-", dir=existing))
    except OSError as e:
        raise UsageError(
            f"--out {out}: cannot create folders in {existing} ({e.strerror}); choose another --out"
        ) from None


def check_resume_model(path: str, train: TrainConfig, class_keys: list[str] | None = None) -> None:
    """The checkpoint's network is the one this run builds: its hyper-parameters say which, and
    (given the run's classes) every weight has the shape this run's network has."""
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    if class_keys is not None and isinstance(checkpoint.get("state_dict"), dict):
        _check_weight_shapes(path, checkpoint["state_dict"], train, class_keys)
    if not isinstance(hparams, dict):
        return
    defaults = {"head": "linear"}  # checkpoints from before the t-ReX head have a linear one
    for key in ("arch", "head"):
        saved, wanted = hparams.get(key, defaults.get(key)), getattr(train, key, None)
        if saved is not None and wanted is not None and saved != wanted:
            raise UsageError(
                f"--resume {path}: the checkpoint's network has --train.{key} {saved}, this run's {wanted}; "
                f"resume with --train.{key} {saved}"
            )


def _check_weight_shapes(path: str, weights: dict[str, Any], train: TrainConfig, class_keys: list[str]) -> None:
    """Each weight of this run's network (built on the meta device: shapes, no memory) in the checkpoint, same shape."""
    import torch

    from streamgen.train.model import Classifier

    with torch.device("meta"):
        wanted = Classifier(arch=train.arch, class_keys=class_keys, head=train.head).state_dict()
    for key, tensor in wanted.items():
        have = weights.get(key)
        if not isinstance(have, torch.Tensor):
            raise UsageError(f"--resume {path}: the checkpoint holds no weight {key} of this run's network")
        if tuple(have.shape) != tuple(tensor.shape):
            raise UsageError(
                f"--resume {path}: its weight {key} has shape {tuple(have.shape)}, this run's network "
                f"{tuple(tensor.shape)} (--train.arch {train.arch}, {len(class_keys)} classes); resume with its settings"
            )
    extra = sorted(set(weights) - set(wanted))
    if extra:
        raise UsageError(f"--resume {path}: the checkpoint holds {extra[0]}, which this run's network has not")


def check_resume_progress(path: str, max_steps: int) -> None:
    """The checkpoint is not already at the run's end (else nothing would train)."""
    step = read_checkpoint(path).get("global_step")
    if isinstance(step, int) and step >= max_steps:
        raise UsageError(
            f"--resume {path}: the checkpoint is at step {step} and this run ends at step {max_steps} "
            "(--train.max_steps or --train.epochs): it is finished; raise them to train on"
        )


def load_resume_cursors(path: str, meta: dict[str, Any], cfg: RunConfig) -> list[UnitCursor]:
    from streamgen.train.stream_data import stream_state

    state = stream_state(read_checkpoint(path))
    if state is None:
        raise UsageError(f"--resume {path}: not a streamgen checkpoint (it holds no stream position)")
    if state["classes"] != meta["classes"]:
        raise UsageError(
            f"--resume {path}: the checkpoint was trained on another class set ({state['class_spec']}); "
            f"run with --classes {state['class_spec']}"
        )
    if state["world"] != meta["world"]:
        raise UsageError(
            f"--resume {path}: the checkpoint's stream has {state['world']} trainer ranks in all (nodes x --trainers), "
            f"this run {meta['world']}; resume with the same --trainers and number of nodes"
        )
    for key, flag in (("seed", "--seed"), ("unit_size", "--stream.batch_size")):
        if state[key] != meta[key]:
            raise UsageError(
                f"--resume {path}: the checkpoint's stream has {flag} {state[key]}; resume with {flag} {state[key]}"
            )
    check_resume_replay(path, cfg, state["cursors"])
    cursors = sorted((UnitCursor.from_state_dict(c) for c in state["cursors"]), key=lambda c: c.rank)
    if [c.rank for c in cursors] != list(range(meta["world"])):
        raise UsageError(
            f"--resume {path}: the checkpoint's stream position is incomplete (ranks {[c.rank for c in cursors]})"
        )
    return cursors


def spent_before_start(cfg: RunConfig, cache: Any = None) -> dict[str, float]:
    """Device-seconds a run has spent before its first step: a built cache's build cost (its
    manifest) and the compute of the checkpoint it resumes (`streamgen.train.compute`'s state)."""
    spent: dict[str, float] = {}
    if cache is not None and cache.complete:
        try:
            build = json.loads((Path(cache.layout.dir) / "manifest.json").read_text()).get("build") or {}
            spent["the cache's build"] = float(build.get("device_seconds", 0.0))
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # the cache's own checks judge the manifest; the monitor says it once
    if cfg.resume:
        state = (read_checkpoint(cfg.resume).get("callbacks") or {}).get("ComputeMonitor") or {}
        held = [state.get(k) for k in ("generator_device_seconds", "trainer_device_seconds")]
        if all(isinstance(v, (int, float)) for v in held):
            spent["the checkpoint it resumes"] = float(sum(held))
    return spent


def check_budget(cfg: RunConfig, cache: Any = None) -> None:
    """A run that has spent its ``--train.budget_gpu_hours`` before its first step is refused, with the figures."""
    budget = cfg.train.budget_gpu_hours
    if budget is None:
        return
    spent = spent_before_start(cfg, cache)
    total = sum(spent.values()) / 3600
    if total >= budget:
        parts = ", ".join(f"{what} {seconds / 3600:.4g}" for what, seconds in spent.items())
        raise UsageError(
            f"--train.budget_gpu_hours {budget:g}: this run has spent {total:.4g} GPU-hours before its first step "
            f"({parts}), so no step fits; raise the budget above {total:.4g}"
        )


def prepare(cfg: RunConfig) -> Job:
    """Every check that can fail on user input; raises UsageError, starts nothing."""
    placement = resolve_placement(cfg.dist)
    if cfg.resume:  # a run folder: its newest last.ckpt
        cfg.resume = resolve_resume(cfg.resume)
    check_run_folder(cfg.out, cfg.name)
    check_precision(cfg.train.precision)
    check_arch(cfg.train.arch)
    classes = load_classes(cfg.classes)
    counts = load_class_counts(cfg.class_counts, classes) if cfg.class_counts else None
    plan = SamplePlan(classes, PromptTemplate.parse(cfg.prompt), cfg.seed, counts)
    if cfg.train.val_dir:  # exists, has a known layout and images of the run's classes
        check_folder(cfg.train.val_dir, classes.keys, "--train.val_dir")
        check_val_set(cfg.train.val_dir, classes.keys)  # a shapes set: rendered for these classes
    if cfg.train.val_shapes:
        if cfg.train.val_dir:
            raise UsageError(
                "--train.val_shapes renders the run's validation set, --train.val_dir names one: give one of the two"
            )
        check_class_count(len(classes), "--train.val_shapes")
    check_procedural(cfg.model, classes.keys, cfg.generator.seconds_per_image)
    if cfg.train.probes:  # every NAME=ROOT read as its dataset is released; the arch has the pooled features
        check_probes(cfg.train.probes)
        check_probe_arch(cfg.train.arch)
    model = cfg.model if cfg.model in PROCEDURAL else resolve_model(cfg.model)
    if Path(model).is_dir():
        check_model_components(model)
    generator_devices, accelerator, trainer_devices = assign_devices(cfg.generators, cfg.trainers)
    if model != FAKE:  # shapes too: the same settings are refused whatever the model
        check_generator(
            cfg.generator, "cuda" if accelerator == "gpu" else "cpu", None if model in PROCEDURAL else model
        )
    check_recipe(cfg.train, accelerator, cfg.trainers * placement.nodes, cfg.stream.batch_size)
    slots = slots_per_rank(cfg)
    queue_bytes = cfg.trainers * slots * slot_nbytes(cfg.stream.batch_size, cfg.stream.resolution)
    check_memory(queue_bytes)
    replay_on_device = check_replay_memory(cfg, accelerator, queue_bytes)
    meta = run_meta(cfg, classes, placement.nodes)
    world, first = meta["world"], placement.node_rank * cfg.trainers
    cache, steps_per_epoch = None, None
    if cfg.source == "cache":  # its checkpoints hold a cache position, not stream cursors
        cache, steps_per_epoch, meta = check_cache_run(cfg, classes, counts, meta, world)
    if cfg.resume and cache is None:
        cursors = load_resume_cursors(cfg.resume, meta, cfg)[first : first + cfg.trainers]  # this node's ranks
    else:
        cursors = [UnitCursor(first + r, world) for r in range(cfg.trainers)]
    if cfg.resume:
        check_resume_model(cfg.resume, cfg.train, classes.keys)
        check_resume_progress(cfg.resume, cfg.train.max_steps)
    check_budget(cfg, cache)
    job = Job(cfg, plan, model, generator_devices, accelerator, trainer_devices, cursors, meta, slots, placement)
    return dataclasses.replace(job, cache=cache, steps_per_epoch=steps_per_epoch, replay_on_device=replay_on_device)
