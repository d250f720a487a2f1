"""The launcher's checks for ``--source cache``, before anything starts or is created.

`check_cache_run` validates the cache's size, folder, free disk and fingerprint (see
`streamgen.cache.layout.check_cache`), that every rank gets at least one batch an epoch, and
the checkpoint to resume; it derives ``train.max_steps`` from ``train.epochs``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamgen.cache.layout import CacheSpec, check_cache
from streamgen.cache.reader import steps_per_epoch
from streamgen.cache.status import check_shards, recorded_sha256
from streamgen.config import MAX_STEPS, RunConfig
from streamgen.errors import UsageError
from streamgen.plan.classes import ClassSet


def check_cache_run(
    cfg: RunConfig, classes: ClassSet, counts: np.ndarray | None, meta: dict[str, Any], world: int
) -> tuple[CacheSpec, int, dict[str, Any]]:
    """(the checked cache, batches per rank per epoch, the run meta a checkpoint must match)."""
    spec = check_cache(cfg, classes.fingerprint(), counts, len(classes))
    check_cache_shards(spec, len(classes), cfg.cache.verify)
    batch = cfg.stream.batch_size
    steps = steps_per_epoch(spec.layout.images, world, batch)
    if steps < 1:
        raise UsageError(
            f"a cache of {spec.layout.images} images has no batch of {batch} for each of {world} trainer ranks: "
            f"use at least {world * batch} images or a smaller --stream.batch_size"
        )
    if cfg.train.epochs is not None:
        cfg.train.max_steps = cfg.train.epochs * steps
        if cfg.train.max_steps > MAX_STEPS:
            raise UsageError(f"--train.epochs {cfg.train.epochs} x {steps} batches an epoch is beyond any run")
    meta = {**meta, "source": "cache", "images": spec.layout.images}
    if cfg.resume:
        check_cache_resume(cfg.resume, meta)
    return spec, steps, meta


def check_cache_shards(spec: CacheSpec, classes: int, verify: bool = True) -> None:
    """The shards already on disk are the ones their build wrote (sizes, labels, and with
    ``verify`` their sha256): a run never trains on a corrupted cache (`CacheDamaged`, one line,
    names the shard)."""
    layout = spec.layout
    sha256 = recorded_sha256(layout.dir) if verify else {}
    check_shards(layout, sha256, classes, None if spec.complete else layout.present())


def check_cache_resume(path: str, meta: dict[str, Any]) -> None:
    """The checkpoint holds a cache position of a run like this one (else UsageError)."""
    from streamgen.launch.resume import read_checkpoint
    from streamgen.train.cache_data import cache_state

    state = cache_state(read_checkpoint(path))
    if state is None:
        raise UsageError(
            f"--resume {path}: not a checkpoint of a cache run (it holds no cache position); resume it with --source stream"
        )
    if state["classes"] != meta["classes"]:
        raise UsageError(
            f"--resume {path}: the checkpoint was trained on another class set ({state['class_spec']}); "
            f"run with --classes {state['class_spec']}"
        )
    flags = (
        ("seed", "--seed"),
        ("unit_size", "--stream.batch_size"),
        ("world", "--trainers (x nodes)"),
        ("images", "--cache.images"),
    )
    for key, flag in flags:
        if state.get(key) != meta[key]:
            raise UsageError(
                f"--resume {path}: the checkpoint's cache run has {flag} {state.get(key)}; resume with the same"
            )
    if sorted(p["rank"] for p in state["positions"]) != list(range(meta["world"])):
        raise UsageError(f"--resume {path}: the checkpoint's cache position is incomplete")
