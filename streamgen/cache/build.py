"""Building the cache: the stream's generators, with a disk writer where the trainer would be.

The launcher's `Supervisor` and the generators' `worker_main` run unchanged: one queue (as for a
single trainer rank that owns every unit), a ledger that holds only the units of the missing
shards, and, in this process, a writer that takes each filled slot, writes it at its place in
its shard's temporary file and frees the slot. A shard whose units are all written is flushed,
fsynced and renamed to its final name; its sha256 and the build's device-seconds so far go to
``progress.json``. When every shard exists, ``manifest.json`` is written (last, atomically).

Device-seconds: generator devices x wall time of each build session, summed over sessions (a
killed build keeps what it recorded at its last finished shard).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from streamgen.cache.layout import (
    MANIFEST,
    MANIFEST_FORMAT,
    CacheSpec,
    Layout,
    fsync_dir,
    read_manifest,
    read_progress,
    write_json,
)
from streamgen.config import RunConfig
from streamgen.generator import WorkerSpec
from streamgen.plan import UnitCursor
from streamgen.queue import FILLED
from streamgen.supervisor import Supervisor


class _FiniteLedger:
    """The units still to make (a min-heap), instead of a rank's endless stream."""

    def __init__(self, units: list[int]) -> None:
        self._todo = sorted(units)

    def __len__(self) -> int:
        return len(self._todo)

    def take(self) -> int:
        return heapq.heappop(self._todo)

    def give_back(self, unit: int) -> None:
        heapq.heappush(self._todo, unit)


class BuildSupervisor(Supervisor):
    """The stream's supervisor over a finite list of units, all for one consumer: the writer."""

    def __init__(self, spec: WorkerSpec, devices: list[str], units: list[int], slots: int, **kw: Any) -> None:
        super().__init__(spec, devices, [UnitCursor(0, 1)], slots, **kw)
        self.ledgers = [_FiniteLedger(units)]

    def _hungriest_rank(self) -> int | None:
        return super()._hungriest_rank() if len(self.ledgers[0]) else None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Open temporary shards; `write` places one unit and finishes its shard when complete."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._open: dict[int, tuple[int, set[int]]] = {}  # shard -> (fd, units written)

    def write(self, unit: int, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> int | None:
        """Write one unit; the shard index if that completed (and renamed) its shard."""
        lay = self.layout
        shard = unit // lay.shard_units
        if shard not in self._open:
            fd = os.open(lay.temp_path(shard), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fd, lay.shard_nbytes(shard))
            self._open[shard] = (fd, set())
        fd, written = self._open[shard]
        n, b = lay.shard_images(shard), lay.unit_size
        first = (unit - shard * lay.shard_units) * b
        _pwrite_all(fd, np.ascontiguousarray(images), first * lay.image_bytes)
        _pwrite_all(fd, np.ascontiguousarray(labels, dtype=np.int64), n * lay.image_bytes + 8 * first)
        _pwrite_all(fd, np.ascontiguousarray(ids, dtype=np.int64), n * (lay.image_bytes + 8) + 8 * first)
        written.add(unit)
        if len(written) < len(lay.shard_units_of(shard)):
            return None
        os.fsync(fd)
        os.close(fd)
        del self._open[shard]
        os.replace(lay.temp_path(shard), lay.shard_path(shard))
        fsync_dir(Path(lay.dir))
        return shard

    def abandon(self) -> None:
        """Remove the temporary files of unfinished shards (a later build makes them again)."""
        for shard, (fd, _) in list(self._open.items()):
            os.close(fd)
            self.layout.temp_path(shard).unlink(missing_ok=True)
        self._open.clear()


def _pwrite_all(fd: int, array: np.ndarray, offset: int) -> None:
    view = memoryview(array).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def sweep_temp_files(folder: Path) -> None:
    """Temporary shards left by a killed build (their names are ours alone)."""
    for path in folder.glob(".shard-*.tmp"):
        path.unlink(missing_ok=True)


class BuildProgress:
    """A tqdm bar with images/s and ETA on a terminal; a plain line every 10 s otherwise."""

    def __init__(self, total: int, done: int, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.total, self.done, self.start_done = total, done, done
        self.started = self._last_line = time.monotonic()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="img", desc="cache", file=self.stream, smoothing=0.1)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self._last_line >= 10 or self.done == self.total:
            self._line()

    def _line(self) -> None:
        self._last_line = now = time.monotonic()
        rate = (self.done - self.start_done) / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f} s" if eta != float("inf") else "?"
        print(
            f"cache: {self.done}/{self.total} images ({100 * self.done / self.total:.1f}%), "
            f"{rate:.1f} images/s, ETA {eta_text}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Progress:
    """progress.json: the fingerprint, finished shards' sha256 and device-seconds so far."""

    def __init__(self, spec: CacheSpec, devices: int) -> None:
        self.folder = Path(spec.layout.dir)
        state = read_progress(self.folder) or {}
        self.state = {
            "format": MANIFEST_FORMAT,
            "fingerprint": spec.fingerprint,
            "device_seconds": float(state.get("device_seconds", 0.0)),
            "sessions": list(state.get("sessions", [])),
            "sha256": dict(state.get("sha256", {})),
        }
        self.devices = devices
        self._before = self.state["device_seconds"]
        self._started = time.monotonic()
        self.state["sessions"].append({"devices": devices, "seconds": 0.0})

    def record(self, shard_name: str | None = None, sha: str | None = None) -> None:
        elapsed = time.monotonic() - self._started
        self.state["sessions"][-1]["seconds"] = elapsed
        self.state["device_seconds"] = self._before + self.devices * elapsed
        if shard_name is not None:
            self.state["sha256"][shard_name] = sha
        write_json(self.folder / "progress.json", self.state)


def supervision(cfg: RunConfig) -> dict[str, Any]:
    """The run's generator supervision settings (restarts, watchdog), as `Supervisor` takes them."""
    s = cfg.stream
    return {
        "max_restarts": s.max_restarts,
        "restart_backoff": s.restart_backoff,
        "restart_window": s.restart_window,
        "hang_timeout": s.hang_timeout,
        "startup_timeout": s.startup_timeout,
    }


def build_slots(cfg: RunConfig) -> int:
    """Slots of the build's one queue: every generator writing while the writer reads."""
    return cfg.stream.slots or cfg.generators + 2


def build_cache(
    spec: CacheSpec,
    worker: WorkerSpec,
    devices: list[str],
    slots: int,
    log: Callable[[str], None] = print,
    progress_stream=None,
    spawn_guard: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    **supervise: Any,
) -> dict[str, Any]:
    """Make the missing shards with ``devices`` generators, then write the manifest; returns it.

    ``spawn_guard``: a context in which the generators are started (the launcher's blocks
    Ctrl-C in them: it alone handles it); ``supervise``: `Supervisor` settings (`supervision`)."""
    layout = spec.layout
    folder = Path(layout.dir)
    folder.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(folder)
    existing = read_manifest(folder)
    missing = layout.missing()
    if existing is not None and not missing:
        return existing  # a finished cache is reused as it is
    progress = _Progress(spec, len(devices))
    if missing:
        log(
            f"building the cache in {folder}: {len(missing)} of {layout.shards} shards to make "
            f"({sum(layout.shard_images(s) for s in missing)} of {layout.images} images) on {len(devices)} generator(s)"
        )
        supervisor = BuildSupervisor(worker, devices, units_of(layout, missing), slots, log=log, **supervise)
        _make_shards(layout, missing, progress, supervisor, spawn_guard, progress_stream)
    return _write_manifest(layout, spec, progress)


def units_of(layout: Layout, shards: list[int]) -> list[int]:
    return [u for s in shards for u in layout.shard_units_of(s)]


def _make_shards(
    layout: Layout, missing: list[int], progress: _Progress, supervisor: BuildSupervisor, spawn_guard, stream
) -> None:
    writer = ShardWriter(layout)
    bar = BuildProgress(layout.images, layout.images - len(units_of(layout, missing)) * layout.unit_size, stream)
    remaining = len(missing)
    try:
        with spawn_guard():
            supervisor.start()
        queue = supervisor.queues[0]
        while remaining:
            supervisor.poll(1.0, extra=[queue.filled])
            queue.filled.drain()
            while queue.count(FILLED):
                slot = queue.get()
                view = queue.view(slot)
                unit = queue.unit(slot)
                shard = writer.write(unit, view.images.numpy(), view.labels.numpy(), view.ids.numpy())
                queue.release(slot)
                bar.update(layout.unit_size)
                if shard is not None:
                    remaining -= 1
                    progress.record(layout.shard_name(shard), sha256_file(layout.shard_path(shard)))
    finally:
        bar.close()
        supervisor.shutdown("the cache is built" if not remaining else "the build stopped", grace=2.0)
        writer.abandon()
        progress.record()


def _write_manifest(layout: Layout, spec: CacheSpec, progress: _Progress) -> dict[str, Any]:
    sha = progress.state["sha256"]
    for s in range(layout.shards):  # shards renamed by a build killed before it recorded them
        name = layout.shard_name(s)
        if name not in sha:
            sha[name] = sha256_file(layout.shard_path(s))
    manifest = {
        "format": MANIFEST_FORMAT,
        "fingerprint": spec.fingerprint,
        "layout": {
            "images": layout.images,
            "unit_size": layout.unit_size,
            "resolution": layout.resolution,
            "shard_units": layout.shard_units,
            "shards": layout.shards,
        },
        "shards": [
            {"name": layout.shard_name(s), "images": layout.shard_images(s), "sha256": sha[layout.shard_name(s)]}
            for s in range(layout.shards)
        ],
        "build": {
            "device_seconds": progress.state["device_seconds"],
            "devices": progress.devices,
            "sessions": progress.state["sessions"],
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(Path(layout.dir) / MANIFEST, manifest)
    return manifest
