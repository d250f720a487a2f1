"""The fixed cache on disk: its size, its shard files, its fingerprint and its manifest.

A cache holds the first N samples of a run's plan (sample ids ``0..N-1``) at the stream
resolution, losslessly (the uint8 pixels the stream would deliver). It is stored as shards:

    DIR/shard-000000.bin ...    shard s = units [s*K, (s+1)*K) (K = cache.shard_units; the last
                                may hold fewer): uint8 images [n, 3, R, R], then int64 labels [n],
                                then int64 sample ids [n], back to back (memory-mapped by readers)
    DIR/progress.json           the build's running state: fingerprint, device-seconds so far,
                                sha256 of every finished shard (rewritten atomically)
    DIR/progress-node{k}.json   the same, of node k, when N nodes build one cache (node k makes
                                the shards s with s % N == k; no two nodes write the same file)
    DIR/manifest.json           written last, atomically, once every shard exists

A shard is written to ``.shard-XXXXXX.{writer}.tmp`` (a name of its writer alone: node and
pid) in the same folder, flushed, fsynced and renamed, so "which units exist" is the list of
``shard-*.bin`` files: a killed build resumes by making only the missing shards.

The size: ``--cache.images N``, or ``--cache.scale S`` = S x the class set's real training-set
size: the sum of ``--class_counts`` when given, else ImageNet-1K's train split (1,281,167
images; ImageNet-100: 126,689) at its mean per class (1,281.167) times the number of classes,
except the two full sets, which get their exact sizes. N is rounded up to a whole number of
units (``stream.batch_size``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamgen.config import RunConfig
from streamgen.errors import UsageError

MANIFEST, PROGRESS = "manifest.json", "progress.json"
MANIFEST_FORMAT = "streamgen-cache/1"
IMAGENET1K_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 train split
IMAGENET100_TRAIN_IMAGES = 126_689  # the CMC ImageNet-100 subset of it
REAL_SIZES = {"imagenet1k": IMAGENET1K_TRAIN_IMAGES, "imagenet100": IMAGENET100_TRAIN_IMAGES}
# Generator settings that change pixels; the others (batch size, compile, threads, ...) do not.
PIXEL_SETTINGS = ("resolution", "steps", "guidance", "scheduler", "dtype", "safety_checker", "max_redraws")
# Pixel settings added later (few-step and cached generators), with the value every older cache was
# built with: a cache whose manifest lacks one was made at that value.
LATER_PIXEL_SETTINGS = {
    "timestep_spacing": "default",
    "eta": None,
    "lora": [],
    "unet": None,
    "deepcache": 0,
    "tome": 0.0,
}


def real_size(class_spec: str, n_classes: int, counts: np.ndarray | None) -> int:
    """Images in the class set's real training set (see the module docstring)."""
    if counts is not None:
        return int(np.sum(counts))
    if class_spec in REAL_SIZES:
        return REAL_SIZES[class_spec]
    return round(IMAGENET1K_TRAIN_IMAGES / 1000 * n_classes)


def cache_images(cfg: RunConfig, n_classes: int, counts: np.ndarray | None) -> int:
    """N, rounded up to whole units; UsageError when neither size is given or it is <= 0."""
    c, unit = cfg.cache, cfg.stream.batch_size
    if c.images is not None and c.scale is not None:
        raise UsageError("give the cache size once: --cache.images N or --cache.scale S, not both")
    if c.images is not None:
        n = c.images
        if n <= 0:
            raise UsageError(f"--cache.images must be at least 1 (got {n})")
    elif c.scale is not None:
        if c.scale <= 0:
            raise UsageError(f"--cache.scale must be > 0 (got {c.scale}); 1 = the real dataset's size")
        n = math.ceil(c.scale * real_size(cfg.classes, n_classes, counts))
    else:
        raise UsageError("--source cache needs a size: --cache.images N or --cache.scale S (S x the real dataset)")
    return -(-n // unit) * unit


@dataclass(frozen=True)
class Layout:
    """Where each sample lives: shards of ``shard_units`` units of ``unit_size`` images."""

    dir: str
    images: int  # N, a multiple of unit_size
    unit_size: int
    resolution: int
    shard_units: int

    @property
    def shard_size(self) -> int:
        return self.shard_units * self.unit_size

    @property
    def shards(self) -> int:
        return -(-self.images // self.shard_size)

    @property
    def units(self) -> int:
        return self.images // self.unit_size

    @property
    def image_bytes(self) -> int:
        return 3 * self.resolution * self.resolution

    def shard_images(self, shard: int) -> int:
        return min(self.shard_size, self.images - shard * self.shard_size)

    def shard_units_of(self, shard: int) -> range:
        first = shard * self.shard_units
        return range(first, min(first + self.shard_units, self.units))

    def shard_nbytes(self, shard: int) -> int:
        return self.shard_images(shard) * (self.image_bytes + 16)

    def total_nbytes(self) -> int:
        return self.images * (self.image_bytes + 16)

    def shard_name(self, shard: int) -> str:
        return f"shard-{shard:06d}.bin"

    def shard_path(self, shard: int) -> Path:
        return Path(self.dir) / self.shard_name(shard)

    def temp_path(self, shard: int, writer: str) -> Path:
        """The shard's file while ``writer`` (unique to one process of one node) fills it."""
        return Path(self.dir) / f".shard-{shard:06d}.{writer}.tmp"

    def present(self) -> list[int]:
        """Shards that exist complete (their final name, their full size)."""
        return [s for s in range(self.shards) if _size(self.shard_path(s)) == self.shard_nbytes(s)]

    def missing(self) -> list[int]:
        have = set(self.present())
        return [s for s in range(self.shards) if s not in have]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def layout_for(cfg: RunConfig, images: int) -> Layout:
    return Layout(str(cfg.cache.dir), images, cfg.stream.batch_size, cfg.stream.resolution, cfg.cache.shard_units)


def fingerprint(cfg: RunConfig, class_fingerprint: str, counts: np.ndarray | None, images: int) -> dict[str, Any]:
    """What made the cache's pixels: two runs may share a cache iff these are equal."""
    counts_digest = None if counts is None else hashlib.sha1(np.asarray(counts, np.int64).tobytes()).hexdigest()[:16]
    return {
        "classes": class_fingerprint,
        "class_counts": counts_digest,
        "seed": cfg.seed,
        "prompt": cfg.prompt,
        "model": cfg.model,
        **{f"generator.{k}": getattr(cfg.generator, k) for k in PIXEL_SETTINGS},
        **{f"generator.{k}": getattr(cfg.generator, k) for k in LATER_PIXEL_SETTINGS},
        "stream.resolution": cfg.stream.resolution,
        "stream.batch_size": cfg.stream.batch_size,
        "cache.shard_units": cfg.cache.shard_units,
        "images": images,
    }


FLAGS = {"classes": "--classes", "class_counts": "--class_counts", "images": "--cache.images/--cache.scale"}


def differing_setting(have: dict[str, Any], want: dict[str, Any]) -> str | None:
    """One line naming the first setting in which a cache (``have``) differs from a run, or None."""
    for key, value in want.items():
        later = LATER_PIXEL_SETTINGS.get(key.removeprefix("generator.")) if key.startswith("generator.") else None
        theirs = have.get(key, later)  # a setting newer than the cache: it was made at its default
        if theirs != value:
            flag = FLAGS.get(key, f"--{key}")
            return f"{flag} is {theirs!r} in the cache but {value!r} in this run"
    return None


# -- small JSON files, written atomically ----------------------------------------------------


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Temp file in the same folder (a name of this process alone: two writers never share one),
    flush + fsync, rename, fsync the folder. A failed write (a full disk) removes its temp file:
    ``path`` keeps its last complete version."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is unreadable ({e}); delete the cache folder to rebuild it") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a streamgen cache file (not a JSON object); delete it to rebuild the cache")
    return data


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest, checked to hold a layout and one entry per shard (else UsageError), or None."""
    path = Path(folder) / MANIFEST
    manifest = read_json(path)
    if manifest is None:
        return None
    try:
        m = manifest["layout"]
        layout = Layout(str(folder), *(_positive(m[k]) for k in ("images", "unit_size", "resolution", "shard_units")))
        shards = manifest["shards"]
        ok = isinstance(shards, list) and len(shards) == layout.shards
        ok = ok and all(isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in shards)
        ok = ok and [e.get("name") for e in shards] == [layout.shard_name(s) for s in range(layout.shards)]
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise UsageError(f"{path} is not a valid cache manifest (layout or shard list damaged); delete it to rebuild")
    return manifest


def _positive(value: Any) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(value)
    return value


def manifest_layout(folder: str | Path, manifest: dict[str, Any]) -> Layout:
    m = manifest["layout"]
    return Layout(str(folder), m["images"], m["unit_size"], m["resolution"], m["shard_units"])


class CacheDamaged(UsageError):
    """A shard of a finished cache differs from what its build wrote (size, checksum, labels)."""


def check_shard_sizes(layout: Layout) -> None:
    """Every shard exists at its full size (cheap: one stat a shard), else `CacheDamaged`."""
    for s in range(layout.shards):
        size, want = _size(layout.shard_path(s)), layout.shard_nbytes(s)
        if size != want:
            what = "missing" if size < 0 else f"{size} bytes, not {want}"
            raise CacheDamaged(
                f"{layout.shard_path(s)} is {what}: the cache is damaged; delete that shard and build again "
                "to remake it (python -m streamgen.cache build, same flags)"
            )


def read_progress(folder: str | Path) -> dict[str, Any] | None:
    return read_json(Path(folder) / PROGRESS)


def node_shards(shards: list[int], nodes: int, node_rank: int) -> list[int]:
    """The shards node ``node_rank`` of ``nodes`` makes: ``s % nodes == node_rank`` (disjoint, balanced)."""
    return [s for s in shards if s % nodes == node_rank]


def progress_name(nodes: int, node_rank: int) -> str:
    """The build progress file of one node (``progress.json`` when a single node builds)."""
    return PROGRESS if nodes == 1 else f"progress-node{node_rank}.json"


def all_progress(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Every build progress file in the folder (single-node and per-node builds), by file name."""
    found = {}
    for path in sorted(Path(folder).glob("progress*.json")):
        state = read_json(path)
        if state is not None:
            found[path.name] = state
    return found


# -- the checks before anything starts -------------------------------------------------------


@dataclass(frozen=True)
class CacheSpec:
    """A checked cache: its layout, its fingerprint, and whether it still needs building."""

    layout: Layout
    fingerprint: dict[str, Any]
    complete: bool


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_cache(cfg: RunConfig, class_fingerprint: str, counts: np.ndarray | None, n_classes: int) -> CacheSpec:
    """Size, folder, free disk and fingerprint of the run's cache; raises UsageError, creates nothing."""
    images = cache_images(cfg, n_classes, counts)
    if not cfg.cache.dir:
        raise UsageError("--source cache needs --cache.dir: a folder on local disk for the cache's shards")
    folder = Path(cfg.cache.dir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--cache.dir {folder} is a file, not a folder")
    layout = layout_for(cfg, images)
    want = fingerprint(cfg, class_fingerprint, counts, images)
    manifest = read_manifest(folder) if folder.is_dir() else None
    recorded = [manifest] if manifest else list(all_progress(folder).values()) if folder.is_dir() else []
    for found in recorded:
        why = differing_setting(found.get("fingerprint", {}), want)
        if why:
            raise UsageError(f"--cache.dir {folder} holds a cache of another plan: {why}; use another --cache.dir")
    complete = manifest is not None and not layout.missing()
    if not complete:
        _check_room(layout, folder)
    return CacheSpec(layout, want, complete)


def _check_room(layout: Layout, folder: Path) -> None:
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise UsageError(f"--cache.dir {folder}: {base} is a file, so no folder can be made there; pick another")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"--cache.dir {folder}: {base} is not writable; pick a folder you can write to")
    free = shutil.disk_usage(base).free
    # The whole cache first (arithmetic, no stat): a cache far too big is refused at once,
    # before one stat per shard (10^12 images: millions of shards) is spent on it.
    needed = layout.total_nbytes()
    if needed > free and folder.is_dir() and any(folder.glob("shard-*.bin")):
        needed = sum(layout.shard_nbytes(s) for s in layout.missing())
    if needed > free:
        raise UsageError(
            f"--cache.dir {folder}: the cache needs {needed / 2**30:.2f} GiB more but {base} has "
            f"{free / 2**30:.2f} GiB free; free space, pick another disk or lower --cache.images"
        )
