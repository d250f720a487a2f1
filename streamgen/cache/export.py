"""Export a finished cache for other tools: an ImageFolder tree of PNGs, or WebDataset shards.

Each sample carries its id, class key, label, prompt and noise seed (from the run's plan):

- ``imagefolder``: ``DIR/<class key>/<id:09d>.png`` and ``DIR/samples.jsonl`` (one JSON line per
  sample: path, id, class, label, prompt, seed); torchvision's ``ImageFolder`` reads the tree.
- ``webdataset``: ``DIR/cache-000000.tar`` ... (``webdataset.ShardWriter``), each sample a
  ``<id:09d>.png`` and a ``<id:09d>.json`` with the same fields.

The export is written into ``DIR.partial`` and renamed to ``DIR`` at the end, so an
interrupted export leaves no half-filled target (it removes its partial folder). The partial
folder holds a marker file (``.streamgen-export``) from the moment it is made: an export removes
a ``DIR.partial`` only if it bears the marker (one a killed export left); any other is the
user's and the export refuses. Every file is written inside ``DIR``, whatever the manifest or
the class names say (each path is resolved and checked to be inside it).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from streamgen.cache.reader import CacheReader
from streamgen.errors import UsageError
from streamgen.plan.samples import SamplePlan

FORMATS = ("imagefolder", "webdataset")
CHUNK = 256  # samples read from the cache at a time
MARKER = ".streamgen-export"  # in a partial folder this export made (and may remove)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(buffer, format="PNG")
    return buffer.getvalue()


def _records(reader: CacheReader, plan: SamplePlan):
    """(image CHW uint8, metadata) for every sample, in id order."""
    for start in range(0, len(reader), CHUNK):
        ids = np.arange(start, min(start + CHUNK, len(reader)))
        images, labels, stored_ids = reader.gather(ids)
        for image, sample in zip(images.numpy(), plan.samples(stored_ids.numpy())):
            meta = {
                "id": sample.id,
                "class": sample.key,
                "label": sample.label,
                "prompt": sample.prompt,
                "seed": sample.seed,
            }
            yield image, meta


def export(reader: CacheReader, plan: SamplePlan, target: str | Path, fmt: str, per_tar: int = 10000) -> int:
    """Write the cache to ``target`` (which must not exist); returns the number of samples."""
    target = Path(target)
    partial = partial_folder(target)
    if partial.exists() or partial.is_symlink():
        if not _ours(partial):
            raise UsageError(
                f"export: {partial} exists and was not made by an export; move it away (it is not removed)"
            )
        shutil.rmtree(partial)  # a killed export's leftovers: its marker says so
    partial.mkdir(parents=True)
    (partial / MARKER).write_text(f"{os.getpid()}\n")
    try:
        count = (
            _imagefolder(reader, plan, partial) if fmt == "imagefolder" else _webdataset(reader, plan, partial, per_tar)
        )
        (partial / MARKER).unlink()
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return count


def partial_folder(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def _ours(partial: Path) -> bool:
    """A folder (not a link) that an export made: it holds the marker."""
    return partial.is_dir() and not partial.is_symlink() and (partial / MARKER).is_file()


def inside(root: Path, name: str) -> Path:
    """``root / name``, refused unless it resolves to a path strictly inside ``root``."""
    base = root.resolve()
    path = (base / name).resolve()
    if path == base or not path.is_relative_to(base):
        raise UsageError(f"export: {name!r} would be written outside {root}; the cache's class names are unsafe")
    return path


def _imagefolder(reader: CacheReader, plan: SamplePlan, root: Path) -> int:
    count = 0
    with open(root / "samples.jsonl", "w") as index:
        for image, meta in _records(reader, plan):
            name = f"{meta['class']}/{meta['id']:09d}.png"
            path = inside(root, name)
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(_png(image))
            index.write(json.dumps({"path": name, **meta}) + "\n")
            count += 1
    return count


def _webdataset(reader: CacheReader, plan: SamplePlan, root: Path, per_tar: int) -> int:
    import webdataset as wds

    count = 0
    with wds.ShardWriter(str(root / "cache-%06d.tar"), maxcount=per_tar, verbose=0) as sink:
        for image, meta in _records(reader, plan):
            sink.write({"__key__": f"{meta['id']:09d}", "png": _png(image), "json": json.dumps(meta).encode()})
            count += 1
    return count
