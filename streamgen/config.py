"""Run configuration: dataclasses, read from YAML, overridden from the command line.

Every field is a config key and a flag: top-level fields are ``--name``, section fields are
``--section.name`` (``--generator.steps 50``). A YAML file sets any of them with the same
nesting; the command line wins. Unknown keys, wrong types and impossible values are a
`UsageError` (one line, exit 2) before anything starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamgen.errors import EXIT_USAGE, UsageError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class GeneratorConfig:
    resolution: int = _f(512, "generation size in pixels (SD v1.x: 512); a multiple of 8")
    steps: int = _f(50, "denoising steps (the paper: 50)")
    guidance: float = _f(
        7.5, "classifier-free guidance scale (the paper: 7.5, or 2.0 for more diverse images); <= 1 turns guidance off"
    )
    scheduler: str = _f(
        "default",
        "the model's own scheduler ('default'), 'ddim', 'dpm++', 'euler-a' (Euler ancestral: SD-Turbo's), 'lcm' "
        "(LCM / LCM-LoRA) or 'tcd' (TCD LoRAs), each from diffusers, built on the model's scheduler config",
    )
    timestep_spacing: str = _f(
        "default",
        "'default' (the model's own, like --generator.scheduler default: SD v1.x 'leading', SD-Turbo 'trailing'), or 'leading', 'trailing' (what few "
        "steps from SD v1.x need: the first step at the last timestep) or 'linspace'",
        choices=("default", "leading", "trailing", "linspace"),
    )
    eta: float | None = _f(
        None, "the scheduler's stochasticity: TCD's gamma (default 0.3, TCD's), DDIM's eta (default 0); others: unset"
    )
    lora: list[str] = _f(
        [],
        "LoRA weights fused into the model: PATH[:SCALE] (a .safetensors file or folder, or a cached Hugging Face id "
        "ORG/NAME, never downloaded), repeatable (--generator.lora A --generator.lora B:0.5)",
    )
    unet: str | None = _f(
        None, "a UNet folder (or cached Hugging Face id) loaded in place of the model's, e.g. a distilled one (DMD2)"
    )
    deepcache: int = _f(
        0, "DeepCache: recompute the UNet's deep features every N steps (0: off; 3 in its paper; needs [deepcache])"
    )
    tome: float = _f(0.0, "ToMe-SD: fraction of tokens merged in the UNet's attention (0: off, <= 0.75; needs [tome])")
    batch_size: int = _f(16, "images per denoising batch on one generator; must divide stream.batch_size")
    dtype: str = _f("auto", "auto (float16 on GPU, float32 on CPU), float16, bfloat16 or float32")
    attention: str = _f(
        "sdpa", "'sdpa' (PyTorch scaled-dot-product attention) or 'xformers' (needs the xformers extra)"
    )
    compile: str = _f(
        "auto",
        "torch.compile the UNet: 'auto' (on GPU with CUDA graphs, unless attention is xformers), 'on' or 'off'",
    )
    compile_vae: bool = _f(
        False,
        "also torch.compile the VAE decoder (needs the UNet compiled; bench/generate.py --compile-vae measures it)",
    )
    channels_last: bool = _f(True, "channels-last memory format for the UNet and VAE")
    text_cache: int = _f(4096, "text embeddings kept per generator (one per distinct prompt)")
    safety_checker: bool = _f(False, "run the model's NSFW safety checker; flagged (black) images are redrawn")
    max_redraws: int = _f(3, "redraws of a sample whose image comes out black or non-finite")
    threads: int = _f(0, "CPU threads per generator (0: the cores shared among all processes)")
    seconds_per_image: float | None = _f(
        None,
        "built-in generators (--model shapes or fake) only: each image takes this many seconds of its generator "
        "(it sleeps for the rest), to give a CPU run the cost ratio of generation to training of SD and a ResNet on "
        "GPUs (ratio = this x the trainer's images/s); unset: as fast as they go",
    )


@dataclass
class StreamConfig:
    resolution: int = _f(256, "side of the images in the queue; generators resize to it on their device")
    batch_size: int = _f(256, "images per trainer step on each rank: one queue slot, one 'unit' of sample ids")
    slots: int | None = _f(None, "queue slots per trainer rank (default: generators/trainers + 2)")
    max_restarts: int = _f(
        3,
        "restarts of one generator within restart_window seconds; one that fails more often is retired (the run "
        "goes on with the others, and stops with a checkpoint when none is left)",
    )
    restart_backoff: float = _f(2.0, "seconds before the first restart of a failed generator; doubles each time")
    restart_window: float = _f(
        3600.0, "seconds over which max_restarts counts: older failures are forgiven (a multi-day run meets a few)"
    )
    hang_timeout: float | None = _f(
        None,
        "seconds a generator may deliver nothing before it is killed and restarted (its unit is made again); "
        "default: 10x its median time per unit, at least 60 s",
    )
    startup_timeout: float = _f(
        1800.0,
        "seconds a generator (or trainer rank) may take to start: loading the model, compiling (minutes on GPU), "
        "and its first unit",
    )
    order: str = _f(
        "increasing",
        "the order a rank consumes its units: 'increasing' (reproducible: two runs feed the same samples at the "
        "same steps; a rank may wait for a late unit) or 'arrival' (whichever is ready first; never waits)",
        choices=("increasing", "arrival"),
    )
    reuse: str = _f(
        "1",
        "times each sample is trained on: 1 (the stream: once), K (exactly K: once fresh, K-1 times replayed from "
        "a buffer; needs train.max_steps x batch_size divisible by K) or 'auto' (replay only while no fresh unit "
        "is ready: the trainer never waits; the reuse follows the speed ratio)",
    )
    buffer: int | None = _f(
        None,
        "replay buffer, in samples per trainer rank (reuse K or auto): the staleness bound; on the trainer's GPU "
        "when it fits in a quarter of its memory, else in host memory (default: 32 batches, or the least reuse "
        "K needs)",
    )


@dataclass
class TrainConfig:
    arch: str = _f("resnet50", "torchvision classification model, trained from scratch")
    max_steps: int = _f(100000, "trainer steps; each consumes stream.batch_size new images per rank")
    crop: int = _f(224, "training crop (RandomResizedCrop from the stream images)")
    min_scale: float = _f(0.08, "smallest crop area of RandomResizedCrop (--train.augment single)")
    augment: str = _f(
        "single",
        "'single' (one RandomResizedCrop + flip per image) or 'multicrop' (the paper's recipe, t-ReX's: global and "
        "local crops, colour jitter, grayscale, blur, solarisation; every parameter drawn per image on the device)",
        choices=("single", "multicrop"),
    )
    global_crops: int = _f(1, "multicrop: global crops per image (train.crop px)")
    local_crops: int = _f(8, "multicrop: local crops per image (train.local_crop px); 0 for none")
    global_scale: str = _f("0.25,1.0", "multicrop: 'min,max' area fraction of the stream image in a global crop")
    local_scale: str = _f("0.05,0.25", "multicrop: 'min,max' area fraction of the stream image in a local crop")
    local_crop: int | None = _f(None, "multicrop: local crop side in px (default: 3/7 of train.crop, 96 at 224)")
    global_blur_p: float = _f(
        0.2, "multicrop: probability of the Gaussian blur on a global crop (t-ReX's multi_crop.py: 0.2; DINO: 1.0)"
    )
    local_blur_p: float = _f(0.5, "multicrop: probability of the Gaussian blur on a local crop (t-ReX: 0.5)")
    head: str = _f(
        "linear",
        "'linear' (the network's own fc) or 'trex' (t-ReX: MLP projector 3x2048 + BN + GELU, 256-d bottleneck, "
        "cosine classifier at temperature 0.1) or 'trex-ocm' (t-ReX's default model: the same projector, classified "
        "against class prototypes averaged from a memory of train.memory_size features of an EMA copy of the "
        "network); evaluation and probes always read the pooled backbone features",
        choices=("linear", "trex", "trex-ocm"),
    )
    memory_size: int = _f(
        8192,
        "--train.head trex-ocm: features in the memory the class prototypes are averaged from (t-ReX: 8192); at "
        "least one global batch (stream.batch_size x trainer ranks)",
    )
    sync_batchnorm: bool = _f(
        False, "SyncBatchNorm across trainer ranks (t-ReX does; costs one all-reduce per BN layer)"
    )
    lr: float = _f(0.1, "SGD learning rate per 256 images of global batch (scaled linearly)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-4, "weight decay")
    warmup_steps: int = _f(2500, "linear warm-up steps before the cosine decay (to min_lr at max_steps)")
    warmup_epochs: int | None = _f(
        None, "--source cache: warm-up in epochs over the cache (t-ReX: 10 of 100); replaces warmup_steps"
    )
    warmup_fraction: float | None = _f(
        None,
        "warm-up as a fraction of max_steps in [0, 1) (t-ReX: 10 of 100 epochs, 0.1); replaces warmup_steps and "
        "warmup_epochs, for a stream or a cache",
    )
    min_lr: float = _f(1e-6, "learning rate at the end of the cosine decay (t-ReX: 1e-6)")
    label_smoothing: float = _f(
        0.0, "cross-entropy label smoothing (0, as t-ReX: smoothing hurts the transferability of the features)"
    )
    precision: str = _f("auto", "Lightning precision: auto (bf16-mixed on GPU, 32-true on CPU) or e.g. 16-mixed")
    log_every: int = _f(50, "steps between TensorBoard scalars")
    preview_every: int = _f(500, "steps between image grids of generated samples (0: never)")
    checkpoint_every: int = _f(1000, "steps between checkpoints (they carry the stream position)")
    keep_checkpoints: int = _f(2, "most recent checkpoints kept")
    val_dir: str | None = _f(
        None, "real images, one folder per WordNet id (ImageNet-val layout), evaluated while training"
    )
    val_shapes: int = _f(
        0,
        "render this many held-out images per class of the shapes benchmark (--model shapes; seeds no training "
        "sample has) into the run folder's val_shapes/ and validate on them as on a val_dir (0: none)",
    )
    val_every: int = _f(5000, "steps between evaluations on val_dir")
    val_batch_size: int = _f(256, "batch size of the evaluation on val_dir")
    workers: int = _f(4, "data-loading workers for val_dir")
    probes: str | None = _f(
        None,
        "linear probes while training (the paper's Tab. 2 protocol): NAME=ROOT[,NAME=ROOT], NAME one of aircraft, "
        "cars, dtd, eurosat, flowers, pets, food, sun397, inat2018, inat2019 or folder-X (ROOT/train + ROOT/test)",
    )
    probe_every: int = _f(5000, "steps between linear probes (each extracts features and fits; logs probe/*)")
    probe_subset: int | None = _f(
        None, "at most this many images per class of each probe split (the same ones every time): quicker probes"
    )
    threads: int = _f(0, "CPU threads per trainer (0: the cores shared among all processes)")
    stop_grace: float = _f(
        120.0,
        "seconds the trainers get, after Ctrl-C or SIGTERM (a cluster's pre-emption notice), to finish their step "
        "and write last.ckpt before they are killed; set it below the cluster's kill delay. A second Ctrl-C stops "
        "at once",
    )
    hang_timeout: float = _f(
        1800.0,
        "seconds a trainer rank may make no progress (no step, validation batch or checkpoint, and not waiting "
        "for data) before the run stops: generous, one validation pass or checkpoint must fit in it",
    )
    budget_gpu_hours: float | None = _f(
        None,
        "stop when the run's compute reaches this many GPU-hours (device-hours held by generators and trainers, "
        "plus a cache's build), checkpoint written: compare a cache and a stream run at equal compute",
    )
    epochs: int | None = _f(
        None, "--source cache: epochs over the cache's images; sets max_steps (default: max_steps decides)"
    )


@dataclass
class CacheConfig:
    images: int | None = _f(
        None, "images in the fixed cache (--source cache): sample ids 0..N-1, rounded up to whole stream batches"
    )
    scale: float | None = _f(
        None, "cache size as a multiple of the class set's real training-set size (the paper: 1, 10, 20, 50)"
    )
    dir: str | None = _f(None, "folder of the cache on local disk (built on first use, reused by later runs)")
    format: str = _f("raw", "shard format: 'raw' (lossless uint8, memory-mapped); export for PNG or WebDataset")
    shard_units: int = _f(4, "stream batches (units) per shard file: a killed build redoes at most the open shards")
    verify: bool = _f(
        True,
        "check every shard's sha256 against its build's record before training or exporting (~0.4 GB/s a core); "
        "false: sizes, labels and ids only",
    )


@dataclass
class DistConfig:
    nodes: int | None = _f(
        None,
        "machines in the run, each running train.py with the same config and its own --generators/--trainers "
        "(default: SLURM_NNODES or torchrun's WORLD_SIZE, else 1)",
    )
    node_rank: int | None = _f(None, "this machine's index 0..nodes-1 (default: SLURM_NODEID or NODE_RANK)")
    master_addr: str | None = _f(
        None, "address of node 0, reachable from every node (default: MASTER_ADDR, or the first SLURM node)"
    )
    master_port: int | None = _f(
        None,
        "port of node 0 for the trainers' DDP group; the launchers use the next port (default: MASTER_PORT or 29500)",
    )
    timeout: float = _f(
        120.0,
        "seconds before a lost node stops the others: the DDP collective timeout and the launchers' heartbeat "
        "(torch's default is 30 minutes; keep it well above one training step)",
    )


@dataclass
class RunConfig:
    seed: int = _f(0, "run seed: fixes every sample's class, prompt and noise")
    classes: str = _f(
        "imagenet1k",
        "imagenet1k, imagenet100, a file of WordNet ids or a YAML/CSV of name+description; ':N' or ':id,id' for a subset",
    )
    class_counts: str | None = _f(
        None,
        "sample classes in these proportions: a file of 'class count' lines, or a real dataset's ImageFolder "
        "train tree (images are counted per class folder), e.g. /data/imagenet/train for ImageNet's imbalance",
    )
    prompt: str = _f("c", "prompt template: c, c_hc, c_dc, c_hc_b, or a format string with {c} {h} {d} {b}")
    model: str = _f(
        "CompVis/stable-diffusion-v1-4",
        "diffusers SD 1.x/2.x folder or cached Hugging Face id; 'tiny' or 'sd14-random' for random weights",
    )
    generators: int = _f(1, "generator processes, one per GPU (GPUs 0..N-1), or CPU processes without GPUs")
    trainers: int = _f(1, "trainer processes (DDP ranks), on the GPUs after the generators' (N..N+M-1)")
    out: str = _f("runs", "folder for TensorBoard logs and checkpoints (out/name/version_K)")
    name: str = _f("streamgen", "run name")
    resume: str | None = _f(None, "checkpoint to resume from: the stream continues where it stopped")
    source: str = _f(
        "stream", "'stream' (every image new, seen once) or 'cache' (epochs over a fixed set of --cache.images)"
    )
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(hint: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation like ``int | None``."""
    args = typing.get_args(hint)
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return hint, False


def _is_list(hint: Any) -> bool:
    return typing.get_origin(hint) is list


def _coerce(value: Any, hint: Any, key: str) -> Any:
    if _is_list(hint):  # a repeatable flag (a list of strings): YAML list, or one value
        if value is None:
            return []
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
            raise UsageError(f"config key {key} must be a list of strings, got {value!r}")
        return [str(v) for v in items]
    typ, optional = _base_type(hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UsageError(f"config key {key} cannot be empty")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
    elif typ is int and not isinstance(value, bool):
        try:  # exactly, digit by digit: a float holds only 53 bits (seeds have 63)
            return int(value) if isinstance(value, int) else int(str(value).strip())
        except ValueError:
            pass
        try:
            if float(value) == int(float(value)):
                return int(float(value))
        except (TypeError, ValueError, OverflowError):  # OverflowError: inf
            pass
    elif typ is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif typ is str and isinstance(value, (str, int, float)):
        return str(value)
    raise UsageError(f"config key {key} must be {typ.__name__}, got {value!r}")


def _section_classes() -> dict[str, type]:
    """The nested sections of RunConfig (generator, stream, train) and their dataclasses."""
    return {name: hint for name, hint in _hints(RunConfig).items() if dataclasses.is_dataclass(hint)}


def _flatten(data: dict, source: str) -> dict[str, Any]:
    """``{'generator': {'steps': 5}}`` -> ``{'generator.steps': 5}``, rejecting unknown keys."""
    known = set(config_keys())
    sections = _section_classes()
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, dict):
                raise UsageError(f"{source}: '{key}' must be a section (a mapping of keys)")
            for sub, subvalue in value.items():
                flat[f"{key}.{sub}"] = subvalue
        else:
            flat[key] = value
    for key in flat:
        if key not in known:
            close = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"{source}: unknown config key '{key}'{hint}")
    return flat


def config_keys() -> dict[str, Any]:
    """Every config key (dotted) with its type annotation."""
    keys = {}
    sections = _section_classes()
    for name, hint in _hints(RunConfig).items():
        if name in sections:
            for sub, subhint in _hints(sections[name]).items():
                keys[f"{name}.{sub}"] = subhint
        else:
            keys[name] = hint
    return keys


def apply(cfg: RunConfig, flat: dict[str, Any]) -> RunConfig:
    types = config_keys()
    for key, value in flat.items():
        target = cfg
        *path, leaf = key.split(".")
        for part in path:
            target = getattr(target, part)
        value = _coerce(value, types[key], key)
        choices = next(f for f in dataclasses.fields(target) if f.name == leaf).metadata.get("choices")
        if choices and value not in choices:
            raise UsageError(f"--{key} must be {' or '.join(choices)} (got {value!r})")
        setattr(target, leaf, value)
    return cfg


def read_yaml(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config {path} is not a text file (it is not UTF-8): give a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UsageError(f"config {path}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config {path} must be a mapping of keys to values")
    return data


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


class CliParser(argparse.ArgumentParser):
    """The entry points' parser (train.py, eval.py, ...): errors are one line and exit 2, an
    unknown flag gets the closest known one suggested, and flags are never abbreviated."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            token = unknown[0]
            if token.startswith("-"):
                self.error(f"unknown flag {token}{self._closest(token)}")
            self.error(f"unexpected argument {token!r}: every setting is a --flag VALUE pair")
        return parsed

    def _closest(self, token: str) -> str:
        flags = [o for a in self._actions for o in a.option_strings]
        close = difflib.get_close_matches(token.split("=", 1)[0], flags, n=1, cutoff=0.6)
        return f" (did you mean {close[0]}?)" if close else " (see --help)"


def build_parser(
    prog: str, description: str, defaults: RunConfig | None = None, config_path: str | None = None
) -> argparse.ArgumentParser:
    """One flag per config key; the help shows ``defaults`` (what ``--config`` resolves to)."""
    usage = "%(prog)s [--config FILE] [--KEY VALUE ...]  (every config key is a flag; see below)"
    parser = CliParser(prog=prog, description=description, usage=usage)
    parser.add_argument("--config", help="YAML file of config keys (see configs/); flags below override it")
    defaults = defaults if defaults is not None else RunConfig()
    plain = RunConfig()
    origin = f", from {Path(config_path).name}" if config_path else ""
    sections = _section_classes()
    for name, hint in _hints(RunConfig).items():
        if name in sections:
            group = parser.add_argument_group(f"{name} (--{name}.KEY)")
            for f in dataclasses.fields(sections[name]):
                value, base = getattr(getattr(defaults, name), f.name), getattr(getattr(plain, name), f.name)
                _add_flag(group, f"{name}.{f.name}", f, value, origin if value != base else "")
        else:
            f = next(x for x in dataclasses.fields(RunConfig) if x.name == name)
            value = getattr(defaults, name)
            _add_flag(parser, name, f, value, origin if value != getattr(plain, name) else "")
    return parser


def _add_flag(parser, key: str, f: dataclasses.Field, default: Any, origin: str = "") -> None:
    # SUPPRESS: only flags the user gave override the YAML; the help still shows the default.
    hint = f.type if not isinstance(f.type, str) else _hints_of_field(key)
    if _is_list(hint):  # repeatable: each use adds one item (the flags replace the YAML's list)
        parser.add_argument(
            f"--{key}",
            dest=key,
            default=argparse.SUPPRESS,
            action="append",
            metavar=key.split(".")[-1].upper(),
            help=f"{f.metadata.get('help', '')} (default: {default or 'none'}{origin})",
        )
        return
    is_bool = _base_type(hint)[0] is bool
    choices = f.metadata.get("choices")
    parser.add_argument(
        f"--{key}",
        dest=key,
        default=argparse.SUPPRESS,
        metavar="{true,false}"
        if is_bool
        else ("{" + ",".join(choices) + "}" if choices else key.split(".")[-1].upper()),
        nargs="?" if is_bool else None,
        const="true" if is_bool else None,  # a bare boolean flag turns it on
        help=_flag_help(f.metadata.get("help", ""), default, origin),
    )


def _flag_help(text: str, default: Any, origin: str) -> str:
    """The help with one default: the field's own words for an unset (None) default that it
    describes ('default: generators/trainers + 2'), else the value."""
    if default is None and "default:" in text:
        return text
    if "default:" in text:  # its own words describe the default; this config sets another value
        return f"{text} (here: {default}{origin})"
    return f"{text} (default: {default}{origin})"


def _hints_of_field(key: str) -> Any:
    return config_keys()[key]


MAX_STEPS = 10**12  # far beyond any run; larger values overflow the trainer's int64 counters


def _given_on_the_command_line(argv: list[str] | None, flag: str) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return any(a == flag or a.startswith(flag + "=") for a in args)


def parse_config(argv: list[str] | None, prog: str = "train.py", description: str = "") -> RunConfig:
    """Parse flags (and the YAML they name) into a validated RunConfig or exit 2 with one line."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config
    from_yaml = _flatten(read_yaml(config_path), config_path) if config_path else {}
    # The help shows what this --config resolves to, so build the parser on those defaults.
    parser = build_parser(prog, description, apply(RunConfig(), dict(from_yaml)), config_path)
    flags = vars(parser.parse_args(argv))
    flags.pop("config", None)
    cfg = apply(RunConfig(), {**from_yaml, **flags})
    validate(cfg)
    if cfg.train.epochs is not None and _given_on_the_command_line(argv, "--train.max_steps"):
        raise UsageError(
            f"--train.max_steps and --train.epochs ({cfg.train.epochs}) both set the run's length: give one "
            "(epochs sets max_steps to epochs x the cache's batches per rank)"
        )
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that need nothing but the values themselves."""
    pace = cfg.generator.seconds_per_image
    if pace is not None and not (pace > 0 and math.isfinite(pace)):  # before the generic ">= 0": 0 is refused too
        raise UsageError(f"--generator.seconds_per_image must be > 0 (got {pace:g}); leave it unset for full speed")
    _validate_numbers(cfg)
    g, s, t = cfg.generator, cfg.stream, cfg.train
    checks = [
        (
            cfg.dist.timeout > 0,
            f"--dist.timeout must be > 0 seconds (got {cfg.dist.timeout}): how long a lost node may go unnoticed",
        ),
        (cfg.dist.nodes is None or cfg.dist.nodes >= 1, f"--dist.nodes must be at least 1 (got {cfg.dist.nodes})"),
        (cfg.generators >= 1, f"--generators must be at least 1 (got {cfg.generators})"),
        (cfg.trainers >= 1, f"--trainers must be at least 1 (got {cfg.trainers})"),
        (g.guidance >= 0, f"--generator.guidance must be >= 0 (got {g.guidance}); 7.5 or 2.0 as in the paper"),
        (g.steps >= 1, f"--generator.steps must be at least 1 (got {g.steps})"),
        (
            g.resolution >= 8 and g.resolution % 8 == 0,
            f"--generator.resolution must be a multiple of 8 (got {g.resolution}): the VAE works on 8x8 pixel cells",
        ),
        (
            g.scheduler in SCHEDULERS,
            f"--generator.scheduler must be {', '.join(SCHEDULERS)} (got {g.scheduler!r})",
        ),
        (
            g.tome < 0.75 + 1e-9,
            f"--generator.tome must be at most 0.75 (got {g.tome:g}): ToMe-SD merges 3 of 4 tokens at most",
        ),
        (g.eta is None or g.eta <= 1, f"--generator.eta must be in [0, 1] (got {g.eta})"),
        (
            g.dtype in ("auto", "float16", "bfloat16", "float32"),
            f"--generator.dtype must be auto, float16, bfloat16 or float32 (got {g.dtype!r})",
        ),
        (g.attention in ("sdpa", "xformers"), f"--generator.attention must be sdpa or xformers (got {g.attention!r})"),
        (g.compile in ("auto", "on", "off"), f"--generator.compile must be auto, on or off (got {g.compile!r})"),
        (g.batch_size >= 1, f"--generator.batch_size must be at least 1 (got {g.batch_size})"),
        (g.max_redraws >= 0, "--generator.max_redraws must be >= 0"),
        (s.batch_size >= 1, f"--stream.batch_size must be at least 1 (got {s.batch_size})"),
        (
            g.batch_size >= 1 and s.batch_size % g.batch_size == 0,
            f"a queue slot holds one trainer batch of {s.batch_size} images, which must be a whole number of generator batches of {g.batch_size}: make --stream.batch_size a multiple of --generator.batch_size",
        ),
        (
            s.slots is None or s.slots >= 1,
            f"--stream.slots must be at least 1 (got {s.slots}): a queue of zero slots cannot carry anything",
        ),
        (
            s.resolution >= t.crop or t.crop <= 0,
            f"--train.crop {t.crop} is larger than the stream images (--stream.resolution {s.resolution})",
        ),
        (s.resolution >= 8, "--stream.resolution must be at least 8"),
        (s.max_restarts >= 0, "--stream.max_restarts must be >= 0"),
        (s.restart_window > 0, f"--stream.restart_window must be > 0 seconds (got {s.restart_window:g})"),
        (
            s.hang_timeout is None or s.hang_timeout > 0,
            f"--stream.hang_timeout must be > 0 seconds, or null to derive it (got {s.hang_timeout})",
        ),
        (s.startup_timeout > 0, f"--stream.startup_timeout must be > 0 seconds (got {s.startup_timeout:g})"),
        (t.hang_timeout > 0, f"--train.hang_timeout must be > 0 seconds (got {t.hang_timeout:g})"),
        (t.max_steps >= 1, f"--train.max_steps must be at least 1 (got {t.max_steps})"),
        (t.max_steps <= MAX_STEPS, f"--train.max_steps {t.max_steps} is beyond any run: at most {MAX_STEPS:.0e}"),
        (t.checkpoint_every >= 1, "--train.checkpoint_every must be at least 1"),
        (t.probe_every >= 1, f"--train.probe_every must be at least 1 step (got {t.probe_every})"),
        (
            t.probe_subset is None or t.probe_subset >= 2,
            f"--train.probe_subset must be at least 2 images per class (got {t.probe_subset}): the probe "
            "validates on a per-class split",
        ),
        (0 < t.min_scale <= 1, "--train.min_scale must be in (0, 1]"),
        (cfg.seed >= 0, "--seed must be >= 0"),
        (
            t.budget_gpu_hours is None or t.budget_gpu_hours > 0,
            f"--train.budget_gpu_hours must be > 0 (got {t.budget_gpu_hours}); leave it unset for no budget",
        ),
        (cfg.source in ("stream", "cache"), f"--source must be stream or cache (got {cfg.source!r})"),
        (
            cfg.cache.format == "raw",
            f"--cache.format must be raw (got {cfg.cache.format!r}); export writes PNG or WebDataset",
        ),
        (cfg.cache.shard_units >= 1, f"--cache.shard_units must be at least 1 (got {cfg.cache.shard_units})"),
        (t.epochs is None or t.epochs >= 1, f"--train.epochs must be at least 1 (got {t.epochs})"),
        (
            t.epochs is None or t.epochs <= MAX_STEPS,
            f"--train.epochs {t.epochs} is beyond any run: at most {MAX_STEPS:.0e}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    _validate_recipe(cfg)
    _validate_training(cfg)
    _validate_replay(cfg)


def reuse_of(cfg: RunConfig) -> int | None:
    """``stream.reuse`` as a number K, or None for 'auto' (validated by `validate`)."""
    text = str(cfg.stream.reuse).strip().lower()
    return None if text == "auto" else int(text)


def min_capacity(batch: int, reuse: int | None) -> int:
    """The smallest replay buffer a schedule works with (`streamgen.train.replay`): one batch for
    auto; for reuse K, what a ramp of one step holds: K-1 uses left for one batch's samples, the
    unit being taken fresh and the next, and the rounding of the fresh counts."""
    if reuse is None or reuse == 1:
        return batch
    return batch * (reuse - 1) + reuse + 2 * batch


def replay_buffer(cfg: RunConfig) -> int:
    """``stream.buffer``, or its default: 32 batches, at least what reuse K needs."""
    if cfg.stream.buffer is not None:
        return cfg.stream.buffer
    return max(32 * cfg.stream.batch_size, min_capacity(cfg.stream.batch_size, reuse_of(cfg)))


def _validate_replay(cfg: RunConfig) -> None:
    """--stream.reuse and --stream.buffer, alone and with the run's batch, steps and source."""
    s, t = cfg.stream, cfg.train
    text = str(s.reuse).strip().lower()
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise UsageError(f"--stream.reuse must be a whole number >= 1 or auto (got {s.reuse!r})")
    reuse = reuse_of(cfg)
    if reuse == 1:
        return
    name = "auto" if reuse is None else str(reuse)
    if cfg.source == "cache":
        raise UsageError(
            f"--stream.reuse {name} replays a stream; a cache run reuses its images by epochs: drop --stream.reuse "
            "or use --source stream"
        )
    buffer = replay_buffer(cfg)
    least = min_capacity(s.batch_size, reuse)
    if buffer < least:
        what = "one batch" if reuse is None else f"(K+1) x batch_size + K for --stream.reuse {reuse}"
        raise UsageError(
            f"--stream.buffer {buffer} is smaller than {what} ({least} samples): raise it to at least {least}"
        )
    if reuse is not None and (t.max_steps * s.batch_size) % reuse:
        step = reuse // math.gcd(s.batch_size, reuse)
        raise UsageError(
            f"--stream.reuse {reuse}: every sample is used exactly {reuse} times only if --train.max_steps x "
            f"--stream.batch_size ({t.max_steps} x {s.batch_size}) is divisible by {reuse}: use a max_steps that is "
            f"a multiple of {step} (e.g. {max(step, t.max_steps // step * step)})"
        )
    if reuse is not None and t.max_steps < reuse:
        raise UsageError(f"--stream.reuse {reuse} needs --train.max_steps of at least {reuse} (got {t.max_steps})")


SCHEDULERS = ("default", "ddim", "dpm++", "euler-a", "lcm", "tcd")  # streamgen.generate.sampling builds them

SEED_LIMIT = 2**63  # seeds are hashed as 64-bit integers and stored in int64 checkpoints


def _validate_numbers(cfg: RunConfig) -> None:
    """Every number a config holds is finite and >= 0 (no key has a meaning below 0)."""
    for key in config_keys():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise UsageError(f"--{key} must be a finite number (got {value})")
        if value < 0:
            raise UsageError(f"--{key} must be >= 0 (got {value:g})")


def _validate_training(cfg: RunConfig) -> None:
    """The trainer's own settings: steps between events, optimiser ranges, run folder name."""
    t = cfg.train
    name = cfg.name
    checks = [
        (cfg.seed < SEED_LIMIT, f"--seed must be below 2**63 (got {cfg.seed}): seeds are 64-bit integers"),
        (t.crop >= 8, f"--train.crop must be at least 8 px (got {t.crop})"),
        (t.log_every >= 1, f"--train.log_every must be at least 1 step (got {t.log_every})"),
        (t.val_every >= 1, f"--train.val_every must be at least 1 step (got {t.val_every})"),
        (t.val_batch_size >= 1, f"--train.val_batch_size must be at least 1 (got {t.val_batch_size})"),
        (t.keep_checkpoints >= 1, f"--train.keep_checkpoints must be at least 1 (got {t.keep_checkpoints})"),
        (t.lr > 0, f"--train.lr must be > 0 (got {t.lr:g}); the paper's recipe uses 0.1 per 256 images"),
        (t.momentum < 1, f"--train.momentum must be in [0, 1) (got {t.momentum:g})"),
        (t.label_smoothing < 1, f"--train.label_smoothing must be in [0, 1) (got {t.label_smoothing:g})"),
        (
            name not in ("", ".", "..") and "/" not in name and "\\" not in name,
            f"--name {name!r} must be a plain folder name (no '/', not '..'): runs are written under --out",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def parse_range(text: str, key: str) -> tuple[float, float]:
    """``"0.25,1.0"`` -> ``(0.25, 1.0)``, or a UsageError naming ``key``."""
    try:
        low, high = (float(part) for part in str(text).split(","))
    except ValueError:
        raise UsageError(f"--{key} must be two numbers 'min,max' like '0.25,1.0' (got {text!r})") from None
    if not (0 < low <= high <= 1):
        raise UsageError(f"--{key} {text!r} must satisfy 0 < min <= max <= 1: area fractions of the stream image")
    return low, high


def local_crop_size(t: TrainConfig) -> int:
    """The local crop side: as configured, or 3/7 of the global crop (96 px at 224)."""
    return t.local_crop if t.local_crop is not None else max(1, round(t.crop * 3 / 7))


def _validate_recipe(cfg: RunConfig) -> None:
    """The training recipe: augmentation, crops, head and schedule."""
    s, t = cfg.stream, cfg.train
    checks = [
        (t.augment in ("single", "multicrop"), f"--train.augment must be single or multicrop (got {t.augment!r})"),
        (t.head in ("linear", "trex", "trex-ocm"), f"--train.head must be linear, trex or trex-ocm (got {t.head!r})"),
        (
            t.warmup_fraction is None or t.warmup_fraction < 1,
            f"--train.warmup_fraction must be in [0, 1) (got {t.warmup_fraction}): the share of max_steps "
            "spent warming up, e.g. 0.1",
        ),
        (
            t.warmup_fraction is None or t.warmup_epochs is None,
            "--train.warmup_fraction and --train.warmup_epochs both set the warm-up: give one of them",
        ),
        (
            t.head != "trex-ocm" or t.memory_size >= 1,
            f"--train.memory_size must be at least 1 with --train.head trex-ocm (got {t.memory_size})",
        ),
        (t.crop >= 1, f"--train.crop must be at least 1 px (got {t.crop})"),
        (t.min_lr >= 0, f"--train.min_lr must be >= 0 (got {t.min_lr:g})"),
        (t.warmup_steps >= 0, f"--train.warmup_steps must be >= 0 (got {t.warmup_steps})"),
        (
            t.warmup_epochs is None or t.warmup_epochs >= 0,
            f"--train.warmup_epochs must be >= 0 (got {t.warmup_epochs})",
        ),
        (
            t.warmup_epochs is None or cfg.source == "cache",
            "--train.warmup_epochs needs --source cache (a stream has no epochs): use --train.warmup_steps",
        ),
    ]
    for key in ("global_blur_p", "local_blur_p"):  # checked whatever the augmentation: a value, not a use
        value = getattr(t, key)
        if not 0 <= value <= 1:
            raise UsageError(f"--train.{key} must be a probability in [0, 1] (got {value:g}); t-ReX: 0.2 / 0.5")
    if t.augment == "multicrop":
        local = local_crop_size(t)
        checks += [
            (t.global_crops >= 1, f"--train.global_crops must be at least 1 (got {t.global_crops})"),
            (t.local_crops >= 0, f"--train.local_crops must be >= 0 (got {t.local_crops}); 0 for no local crops"),
            (
                local <= s.resolution,
                f"--train.local_crop {local} is larger than the stream images (--stream.resolution {s.resolution})",
            ),
            (local >= 1, f"--train.local_crop must be at least 1 px (got {local})"),
        ]
        parse_range(t.global_scale, "train.global_scale")
        parse_range(t.local_scale, "train.local_scale")
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def slots_per_rank(cfg: RunConfig) -> int:
    """Enough slots that every generator can write while the trainer reads."""
    if cfg.stream.slots is not None:
        return cfg.stream.slots
    return -(-cfg.generators // cfg.trainers) + 2
