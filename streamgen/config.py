"""Run configuration: dataclasses, read from YAML, overridden from the command line.

Every field is a config key and a flag: top-level fields are ``--name``, section fields are
``--section.name`` (``--generator.steps 50``). A YAML file sets any of them with the same
nesting; the command line wins. Unknown keys, wrong types and impossible values are a
`UsageError` (one line, exit 2) before anything starts.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    scheduler: str = _f("default", "the model's own scheduler ('default'), 'ddim' or 'dpm++'")
    batch_size: int = _f(16, "images per denoising batch on one generator; must divide stream.batch_size")
    dtype: str = _f("auto", "auto (float16 on GPU, float32 on CPU), float16, bfloat16 or float32")
    attention: str = _f(
        "sdpa", "'sdpa' (PyTorch scaled-dot-product attention) or 'xformers' (needs the xformers extra)"
    )
    compile: str = _f("auto", "torch.compile the UNet: 'auto' (on GPU, with CUDA graphs), 'on' or 'off'")
    channels_last: bool = _f(True, "channels-last memory format for the UNet and VAE")
    text_cache: int = _f(4096, "text embeddings kept per generator (one per distinct prompt)")
    safety_checker: bool = _f(False, "run the model's NSFW safety checker; flagged (black) images are redrawn")
    max_redraws: int = _f(3, "redraws of a sample whose image comes out black or non-finite")
    threads: int = _f(0, "CPU threads per generator (0: the cores shared among all processes)")


@dataclass
class StreamConfig:
    resolution: int = _f(256, "side of the images in the queue; generators resize to it on their device")
    batch_size: int = _f(256, "images per trainer step on each rank: one queue slot, one 'unit' of sample ids")
    slots: int | None = _f(None, "queue slots per trainer rank (default: generators/trainers + 2)")
    max_restarts: int = _f(3, "restarts of one generator before the run stops with its error")
    restart_backoff: float = _f(2.0, "seconds before the first restart of a failed generator; doubles each time")


@dataclass
class TrainConfig:
    arch: str = _f("resnet50", "torchvision classification model, trained from scratch")
    max_steps: int = _f(100000, "trainer steps; each consumes stream.batch_size new images per rank")
    crop: int = _f(224, "training crop (RandomResizedCrop from the stream images)")
    min_scale: float = _f(0.08, "smallest crop area of RandomResizedCrop")
    lr: float = _f(0.1, "SGD learning rate per 256 images of global batch (scaled linearly)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-4, "weight decay")
    warmup_steps: int = _f(2500, "linear warm-up steps before the cosine decay")
    label_smoothing: float = _f(0.1, "cross-entropy label smoothing")
    precision: str = _f("auto", "Lightning precision: auto (bf16-mixed on GPU, 32-true on CPU) or e.g. 16-mixed")
    log_every: int = _f(50, "steps between TensorBoard scalars")
    preview_every: int = _f(500, "steps between image grids of generated samples (0: never)")
    checkpoint_every: int = _f(1000, "steps between checkpoints (they carry the stream position)")
    keep_checkpoints: int = _f(2, "most recent checkpoints kept")
    val_dir: str | None = _f(
        None, "real images, one folder per WordNet id (ImageNet-val layout), evaluated while training"
    )
    val_every: int = _f(5000, "steps between evaluations on val_dir")
    val_batch_size: int = _f(256, "batch size of the evaluation on val_dir")
    workers: int = _f(4, "data-loading workers for val_dir")
    threads: int = _f(0, "CPU threads per trainer (0: the cores shared among all processes)")


@dataclass
class RunConfig:
    seed: int = _f(0, "run seed: fixes every sample's class, prompt and noise")
    classes: str = _f(
        "imagenet1k",
        "imagenet1k, imagenet100, a file of WordNet ids or a YAML/CSV of name+description; ':N' or ':id,id' for a subset",
    )
    class_counts: str | None = _f(
        None, "file of 'class count' lines: sample classes in these proportions (e.g. a real dataset's)"
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
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(hint: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation like ``int | None``."""
    args = typing.get_args(hint)
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return hint, False


def _coerce(value: Any, hint: Any, key: str) -> Any:
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
        try:
            if float(value) == int(float(value)):
                return int(float(value))
        except (TypeError, ValueError):
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
        setattr(target, leaf, _coerce(value, types[key], key))
    return cfg


def read_yaml(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read config {path}: {e.strerror}") from None
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML file of config keys (see configs/); flags below override it")
    defaults = RunConfig()
    sections = _section_classes()
    for name, hint in _hints(RunConfig).items():
        if name in sections:
            group = parser.add_argument_group(f"{name} (--{name}.KEY)")
            sub_defaults = getattr(defaults, name)
            for f in dataclasses.fields(sections[name]):
                _add_flag(group, f"{name}.{f.name}", f, getattr(sub_defaults, f.name))
        else:
            f = next(x for x in dataclasses.fields(RunConfig) if x.name == name)
            _add_flag(parser, name, f, getattr(defaults, name))
    return parser


def _add_flag(parser, key: str, f: dataclasses.Field, default: Any) -> None:
    # SUPPRESS: only flags the user gave override the YAML; the help still shows the default.
    parser.add_argument(
        f"--{key}",
        dest=key,
        default=argparse.SUPPRESS,
        metavar=key.split(".")[-1].upper(),
        help=f"{f.metadata.get('help', '')} (default: {default})",
    )


def parse_config(argv: list[str] | None, prog: str = "train.py", description: str = "") -> RunConfig:
    """Parse flags (and the YAML they name) into a validated RunConfig or exit 2 with one line."""
    parser = build_parser(prog, description)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    flat = _flatten(read_yaml(config_path), config_path) if config_path else {}
    flat.update(args)
    cfg = apply(RunConfig(), flat)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that need nothing but the values themselves."""
    g, s, t = cfg.generator, cfg.stream, cfg.train
    checks = [
        (cfg.generators >= 1, f"--generators must be at least 1 (got {cfg.generators})"),
        (cfg.trainers >= 1, f"--trainers must be at least 1 (got {cfg.trainers})"),
        (g.guidance >= 0, f"--generator.guidance must be >= 0 (got {g.guidance}); 7.5 or 2.0 as in the paper"),
        (g.steps >= 1, f"--generator.steps must be at least 1 (got {g.steps})"),
        (
            g.resolution >= 8 and g.resolution % 8 == 0,
            f"--generator.resolution must be a multiple of 8 (got {g.resolution}): the VAE works on 8x8 pixel cells",
        ),
        (
            g.scheduler in ("default", "ddim", "dpm++"),
            f"--generator.scheduler must be default, ddim or dpm++ (got {g.scheduler!r})",
        ),
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
            s.batch_size % g.batch_size == 0,
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
        (t.max_steps >= 1, f"--train.max_steps must be at least 1 (got {t.max_steps})"),
        (t.checkpoint_every >= 1, "--train.checkpoint_every must be at least 1"),
        (0 < t.min_scale <= 1, "--train.min_scale must be in (0, 1]"),
        (cfg.seed >= 0, "--seed must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def slots_per_rank(cfg: RunConfig) -> int:
    """Enough slots that every generator can write while the trainer reads."""
    if cfg.stream.slots is not None:
        return cfg.stream.slots
    return -(-cfg.generators // cfg.trainers) + 2
