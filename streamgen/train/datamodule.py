"""The one place where a trainer rank's source is chosen: ``--source stream`` or ``cache``.

Both are a `streamgen.train.source.SourceDataModule`; the launcher hands what they need as a
`SourceSpec` of plain values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamgen.cache.layout import Layout
from streamgen.config import RunConfig
from streamgen.train.cache_data import CacheDataModule
from streamgen.train.source import SourceDataModule
from streamgen.train.stream_data import StreamDataModule


@dataclass(frozen=True)
class SourceSpec:
    """What a rank's source needs from the launcher, as plain values."""

    cfg: RunConfig
    world: int  # trainer ranks over all nodes
    run_meta: dict[str, Any]  # what a checkpoint must match to be resumed
    pin: bool = False  # page-locked cache batches (a GPU trainer): the device copy is asynchronous
    cache_layout: Layout | None = None  # --source cache: the checked cache
    classes: int | None = None  # the run's class count: a cache's labels are range-checked against it


def make_datamodule(
    spec: SourceSpec,
    rank: int,
    run_dir: str | Path,
    queue=None,
    stop_requested: Callable[[], bool] | None = None,
    val_loader: Callable[[], Any] | None = None,
) -> SourceDataModule:
    """The one place where a trainer rank's source is chosen: ``--source stream`` or ``cache``.

    ``rank`` is the global trainer rank; ``queue`` that rank's queue (the stream only);
    ``stop_requested`` the run's stop word, read by the stream while it waits for data;
    ``val_loader`` makes the real-image validation loader (None: no validation)."""
    cfg, t = spec.cfg, spec.cfg.train
    common = dict(
        rank=rank,
        world=spec.world,
        run_meta=spec.run_meta,
        crop=t.crop,
        min_scale=t.min_scale,
        val_loader=val_loader,
        preview_every=t.preview_every,
        consumed_log=Path(run_dir) / f"consumed-rank{rank}.tsv",
    )
    if cfg.source == "cache":
        return CacheDataModule(
            spec.cache_layout,
            seed=cfg.seed,
            batch_size=cfg.stream.batch_size,
            pin=spec.pin,
            classes=spec.classes,
            **common,
        )
    return StreamDataModule(queue, order=cfg.stream.order, stop_requested=stop_requested, **common)
