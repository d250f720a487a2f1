"""``python -m streamgen.cache build|info|verify|export --config CONFIG [config flags]``.

- ``build``: make the run's cache (``--cache.images`` or ``--cache.scale``, ``--cache.dir``) with
  ``--generators`` generator processes, e.g. more than the training run will use; resumes a
  killed build, and does nothing for a finished one. On several nodes (``--dist.nodes N
  --dist.node_rank K``, or SLURM / torchrun variables, as for train.py) each node makes its
  share of the shards into the shared ``--cache.dir``; node 0 writes the manifest.
- ``info``: the manifest (or the unfinished build's progress), shards present, size on disk.
- ``verify``: recompute every shard's sha256 against the manifest; exit 1 if any differs.
- ``export --to DIR --format imagefolder|webdataset``: PNGs in class folders (with a
  ``samples.jsonl``) or WebDataset tars, each sample with its id, class, prompt and seed.

Every config key is a flag, as for train.py; the cache is the one a run with the same config
would use (``--source cache`` is implied).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from streamgen.cache.export import FORMATS, export
from streamgen.cache.layout import CacheSpec, cache_images, check_cache, layout_for, read_manifest
from streamgen.cache.status import info, verify
from streamgen.config import RunConfig, parse_config
from streamgen.errors import EXIT_USAGE, UsageError
from streamgen.launch.cache_checks import check_cache_shards
from streamgen.plan.classes import load_classes
from streamgen.plan.prompts import PromptTemplate
from streamgen.plan.samples import SamplePlan, load_class_counts

PROG = "python -m streamgen.cache"
COMMANDS = ("build", "info", "verify", "export")


def log(message: str) -> None:
    print(f"streamgen.cache: {message}", file=sys.stderr, flush=True)


class _Terminate(Exception):
    pass


def _on_sigterm(signum, frame) -> None:
    raise _Terminate()


def _plan(cfg: RunConfig):
    classes = load_classes(cfg.classes)
    counts = load_class_counts(cfg.class_counts, classes) if cfg.class_counts else None
    return SamplePlan(classes, PromptTemplate.parse(cfg.prompt), cfg.seed, counts), classes, counts


def _finished_cache(cfg: RunConfig, command: str) -> tuple[SamplePlan, CacheSpec]:
    """The run's plan and its finished cache, or UsageError (missing, unfinished, another plan)."""
    plan, classes, counts = _plan(cfg)
    if not cfg.cache.dir or read_manifest(cfg.cache.dir) is None:
        raise UsageError(f"{command}: no finished cache in --cache.dir {cfg.cache.dir}; build it first")
    spec = check_cache(cfg, classes.fingerprint(), counts, len(classes))
    check_cache_shards(spec, len(classes))  # sizes, labels, sha256: never export a damaged cache
    return plan, spec


def cmd_build(cfg: RunConfig) -> int:
    from streamgen.cache.build import CacheBuildFailed, build_cache, build_slots, supervision
    from streamgen.generate.diffusion import check_generator
    from streamgen.generate.pipeline import resolve_model
    from streamgen.generate.shapes import PROCEDURAL, check_procedural
    from streamgen.launch.checks import assign_devices
    from streamgen.launch.nodes import resolve_placement
    from streamgen.stream.worker import WorkerSpec

    placement = resolve_placement(cfg.dist)  # several nodes: each makes its share of the shards
    plan, classes, counts = _plan(cfg)
    spec = check_cache(cfg, classes.fingerprint(), counts, len(classes))
    check_procedural(cfg.model, classes.keys, cfg.generator.seconds_per_image)
    model = cfg.model if cfg.model in PROCEDURAL else resolve_model(cfg.model)
    devices, _, _ = assign_devices(cfg.generators, 0)
    if model not in PROCEDURAL:
        check_generator(cfg.generator, devices[0].split(":")[0], model)
    if spec.complete:
        log(f"the cache in {cfg.cache.dir} is complete ({spec.layout.images} images): nothing to build")
        return 0
    worker = WorkerSpec(
        0, 0, "cpu", cfg.generator.threads, model, cfg.generator, plan, cfg.stream.batch_size, cfg.stream.resolution
    )
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        manifest = build_cache(
            spec,
            worker,
            devices,
            build_slots(cfg),
            log=log,
            nodes=placement.nodes,
            node_rank=placement.node_rank,
            patience=cfg.dist.timeout,
            **supervision(cfg),
        )
    except (KeyboardInterrupt, _Terminate):
        log("interrupted: the finished shards are kept; run the same command to go on")
        return 130
    except CacheBuildFailed as e:
        log(str(e))
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    hours = manifest["build"]["device_seconds"] / 3600
    log(f"done: {spec.layout.images} images in {cfg.cache.dir} ({hours:.3f} device-hours of generation)")
    return 0


def cmd_info(cfg: RunConfig) -> int:
    if not cfg.cache.dir:
        raise UsageError("info: give the cache's folder with --cache.dir")
    plan, classes, counts = _plan(cfg)
    try:
        layout = layout_for(cfg, cache_images(cfg, len(classes), counts))
    except UsageError:
        layout = None  # no size in the config: describe what is there
    print(json.dumps(info(cfg.cache.dir, layout), indent=1))
    return 0


def cmd_verify(cfg: RunConfig) -> int:
    if not cfg.cache.dir:
        raise UsageError("verify: give the cache's folder with --cache.dir")
    if not Path(cfg.cache.dir).is_dir():
        raise UsageError(f"verify: --cache.dir {cfg.cache.dir} is not a folder; give the folder of a built cache")
    problems = verify(cfg.cache.dir)
    for problem in problems:
        print(f"{cfg.cache.dir}: {problem}")
    if not problems:
        print(f"{cfg.cache.dir}: every shard matches the manifest's sha256")
    return 1 if problems else 0


def cmd_export(cfg: RunConfig, target: str, fmt: str) -> int:
    from streamgen.cache.export import partial_folder
    from streamgen.cache.reader import CacheReader

    if fmt not in FORMATS:
        raise UsageError(f"export: --format {fmt!r} is not one of {', '.join(FORMATS)}")
    if Path(target).exists() or Path(target).is_symlink():
        raise UsageError(f"export: --to {target} exists; give a new folder (nothing is overwritten)")
    plan, spec = _finished_cache(cfg, "export")
    reader = CacheReader(spec.layout, classes=len(plan.classes))
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        count = export(reader, plan, target, fmt)
    except (KeyboardInterrupt, _Terminate):  # export() has removed its partial folder
        log(f"interrupted: nothing was exported ({partial_folder(Path(target))} removed); run it again")
        return 130
    except OSError as e:
        log(f"export to {target} failed: {e.strerror or e} ({partial_folder(Path(target))} removed)")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    log(f"exported {count} samples to {target} ({fmt})")
    return 0


def plain_help() -> str:
    """The module docstring as a terminal shows it: no reStructuredText markup."""
    return __doc__.replace("``", "").replace("`", "").strip()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], add_help=False)
    head.add_argument("command", nargs="?", help=", ".join(COMMANDS))  # checked below: one line, not a usage block
    head.add_argument("--to", help="export: the folder to write (must not exist)")
    head.add_argument("--format", default="imagefolder", help="export: imagefolder or webdataset")
    head.add_argument("-h", "--help", action="store_true")
    known, rest = head.parse_known_args(argv)
    if known.command is None and known.help:
        print(plain_help())
        return 0
    if known.command not in COMMANDS:
        what = f"{known.command!r} is not a command" if known.command is not None else "no command"
        print(
            f"{PROG}: error: {what}: give one first: {PROG} {{{','.join(COMMANDS)}}} --config FILE [--KEY VALUE ...]",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if known.help:
        rest.append("--help")
    prog = f"{PROG} {known.command}"
    try:
        cfg = parse_config(rest, prog=prog, description=plain_help())
        if known.command == "build":
            return cmd_build(cfg)
        if known.command == "info":
            return cmd_info(cfg)
        if known.command == "verify":
            return cmd_verify(cfg)
        if not known.to:
            raise UsageError("export: give the folder to write with --to DIR")
        return cmd_export(cfg, known.to, known.format)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
