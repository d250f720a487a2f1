"""``info`` and ``verify``: what a cache folder holds, and whether its shards are intact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streamgen.cache.build import sha256_file
from streamgen.cache.layout import Layout, all_progress, read_manifest, read_progress


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
    m = manifest["layout"]
    layout = Layout(str(folder), m["images"], m["unit_size"], m["resolution"], m["shard_units"])
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
