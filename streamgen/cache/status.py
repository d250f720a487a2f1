"""``info`` and ``verify``: what a cache folder holds, and whether its shards are intact."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from streamgen.cache.build import sha256_file
from streamgen.cache.layout import (
    CacheDamaged,
    Layout,
    all_progress,
    check_shard_sizes,
    manifest_layout,
    read_manifest,
    read_progress,
)


def info(folder: str | Path, layout: Layout | None = None) -> dict[str, Any]:
    """The manifest (or the build's progress, of every node, when unfinished), the shards present and the size on disk."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    shards = sorted(folder.glob("shard-*.bin"))
    present = layout.present() if layout is not None else None
    return {
        "folder": str(folder),
        "complete": manifest is not None,
        "manifest": manifest if manifest is not None else read_progress(folder),
        "progress": {} if manifest is not None else all_progress(folder),  # every node's, when several build
        "shards_on_disk": len(shards),
        "shards_needed": layout.shards if layout is not None else None,
        "shards_complete": len(present) if present is not None else None,
        "bytes": sum(p.stat().st_size for p in shards),
    }


def verify(folder: str | Path) -> list[str]:
    """Problems found (empty if none): every shard of the manifest present, sized and checksummed."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder}: no manifest.json (the cache is not finished: build it)"]
    layout = manifest_layout(folder, manifest)
    problems = []
    for s, entry in enumerate(manifest["shards"]):
        path = folder / entry["name"]
        if not path.is_file():
            problems.append(f"{entry['name']}: missing")
        elif path.stat().st_size != layout.shard_nbytes(s):
            problems.append(f"{entry['name']}: {path.stat().st_size} bytes, expected {layout.shard_nbytes(s)}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['name']}: sha256 differs from the manifest's (corrupted)")
    return problems


def shard_label_problem(layout: Layout, shard: int, classes: int) -> str | None:
    """Why shard ``shard``'s labels or ids are not what its build wrote, or None (reads 16 bytes a sample)."""
    n, path = layout.shard_images(shard), layout.shard_path(shard)
    labels = np.fromfile(path, np.int64, n, offset=n * layout.image_bytes)
    ids = np.fromfile(path, np.int64, n, offset=n * (layout.image_bytes + 8))
    if len(labels) != n or labels.min() < 0 or labels.max() >= classes:
        return f"a label outside 0..{classes - 1}"
    first = shard * layout.shard_size
    if not np.array_equal(ids, np.arange(first, first + n)):
        return f"sample ids other than {first}..{first + n - 1}"
    return None


def check_shards(
    layout: Layout, sha256: dict[str, str], classes: int, shards: list[int] | None = None, workers: int | None = None
) -> None:
    """The checks a run makes when it first maps a cache: each of ``shards`` (default: all, which
    must then be present at their size) has its labels in range, its ids in place and the
    sha256 its build recorded (``sha256``: shard name -> digest; shards without one are not
    hashed). Raises `CacheDamaged` naming the first bad shard. The digests are computed in
    threads (hashlib releases the GIL)."""
    if shards is None:
        check_shard_sizes(layout)
        shards = list(range(layout.shards))
    for s in shards:
        why = shard_label_problem(layout, s, classes)
        if why is not None:
            raise _damaged(layout, s, f"holds {why}")
    todo = [s for s in shards if layout.shard_name(s) in sha256]
    with ThreadPoolExecutor(max(1, min(len(todo), workers or os.cpu_count() or 1))) as pool:
        for s, digest in zip(todo, pool.map(lambda s: sha256_file(layout.shard_path(s)), todo)):
            if digest != sha256[layout.shard_name(s)]:
                raise _damaged(layout, s, "differs from the sha256 its build recorded (corrupted on disk)")


def _damaged(layout: Layout, shard: int, why: str) -> CacheDamaged:
    return CacheDamaged(
        f"{layout.shard_path(shard)} {why}: delete that shard and build again to remake it "
        "(python -m streamgen.cache build, same flags)"
    )


def recorded_sha256(folder: str | Path) -> dict[str, str]:
    """The sha256 of every shard, from the manifest, else from the build's progress files."""
    manifest = read_manifest(folder)
    if manifest is not None:
        return {e["name"]: e["sha256"] for e in manifest["shards"]}
    found: dict[str, str] = {}
    for state in all_progress(folder).values():
        sha = state.get("sha256")
        if isinstance(sha, dict):
            found.update({k: v for k, v in sha.items() if isinstance(v, str)})
    return found
