"""Building the cache: the stream's generators, with a disk writer where the trainer would be.

The launcher's `Supervisor` and the generators' `worker_main` run unchanged: one queue (as for a
single trainer rank that owns every unit), a ledger that holds only the units of the missing
shards, and, in this process, a writer that takes each filled slot, writes it at its place in
its shard's temporary file and frees the slot. A shard whose units are all written is flushed,
fsynced and renamed to its final name; its sha256 and the build's device-seconds so far go to
``progress.json``. When every shard exists, ``manifest.json`` is written (last, atomically).

Several nodes can build one cache into a folder they share (`build_cache` with ``nodes`` N > 1
and this node's ``node_rank``): node k makes only the missing shards s with s % N == k and
records its own ``progress-node{k}.json``, so no two nodes write the same file. A node done with its shards
waits until every shard exists and every node has recorded its last one; node 0 then writes
the manifest and the others wait for it. Every wait is bounded: a node that shows no sign in
the folder (no new shard, no progress record: builders record every few seconds) for
``dist.timeout`` seconds, or that the launchers' `NodeGroup` reports lost, stops the build on
the others with one line (`CacheBuildFailed`); the shards made so far are kept.

One builder at a time per folder (per node when several build): `folder_lock` takes an
``fcntl.flock`` on ``.build.lock``; a second build names the holder and waits, then finds the
shards made. A full disk (ENOSPC) ends the build with one line (`CacheBuildFailed`): finished
shards are kept, the open ones' temporary files removed, ``progress.json`` keeps its last
complete version.

Device-seconds: generator devices x wall time of each build session, summed over sessions and
nodes (a killed build keeps what it recorded at its last finished shard).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import heapq
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from streamgen.cache.layout import (
    MANIFEST,
    MANIFEST_FORMAT,
    PROGRESS,
    CacheSpec,
    Layout,
    all_progress,
    fsync_dir,
    node_shards,
    progress_name,
    read_json,
    read_manifest,
    write_json,
)
from streamgen.config import RunConfig
from streamgen.plan.samples import UnitCursor
from streamgen.stream.queue import FILLED
from streamgen.stream.supervisor import Supervisor
from streamgen.stream.worker import WorkerSpec


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


class CacheBuildFailed(RuntimeError):
    """The nodes building one cache cannot finish it: a node is lost, or the folder is not shared."""


class ShardWriter:
    """Open temporary shards; `write` places one unit and finishes its shard when complete.

    ``writer`` names this process in its temporary files (default: its pid; a node adds its
    rank), so that writers sharing a folder never open the same file."""

    def __init__(self, layout: Layout, writer: str | None = None) -> None:
        self.layout = layout
        self.writer = writer or str(os.getpid())
        self._open: dict[int, tuple[int, set[int]]] = {}  # shard -> (fd, units written)

    def write(self, unit: int, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> int | None:
        """Write one unit; the shard index if that completed (and renamed) its shard."""
        lay = self.layout
        shard = unit // lay.shard_units
        if shard not in self._open:
            fd = os.open(lay.temp_path(shard, self.writer), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
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
        os.replace(lay.temp_path(shard, self.writer), lay.shard_path(shard))
        fsync_dir(Path(lay.dir))
        return shard

    def abandon(self) -> None:
        """Remove the temporary files of unfinished shards (a later build makes them again)."""
        for shard, (fd, _) in list(self._open.items()):
            os.close(fd)
            self.layout.temp_path(shard, self.writer).unlink(missing_ok=True)
        self._open.clear()


def _pwrite_all(fd: int, array: np.ndarray, offset: int) -> None:
    view = memoryview(array).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def sweep_temp_files(folder: Path, shards: set[int]) -> None:
    """Temporary files of ``shards`` (this node's) left by a killed build: only this node
    writes those shards, so no other node's file in progress is touched."""
    for path in folder.glob(".shard-*.tmp"):
        number = path.name.removeprefix(".shard-").split(".")[0]
        if number.isdigit() and int(number) in shards:
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
    """One node's progress file (``progress.json``, or ``progress-node{k}.json`` when several
    nodes build): the fingerprint, the sha256 of the shards it finished, its device-seconds so
    far, and ``done`` once it has made all its shards (what the other nodes wait for)."""

    def __init__(self, spec: CacheSpec, devices: int, name: str = PROGRESS, node: int | None = None) -> None:
        self.path = Path(spec.layout.dir) / name
        state = read_json(self.path) or {}
        self.state = {
            "format": MANIFEST_FORMAT,
            "fingerprint": spec.fingerprint,
            "device_seconds": float(state.get("device_seconds", 0.0)),
            "sessions": list(state.get("sessions", [])),
            "sha256": dict(state.get("sha256", {})),
            "devices": devices,
            "done": False,
        }
        if node is not None:
            self.state["node"] = node
        self.devices, self.node = devices, node
        self._before = self.state["device_seconds"]
        self._started: float | None = None  # no session until this node makes shards
        self._written = 0.0

    def begin(self) -> None:
        """A build session starts: its generators' device-seconds count from now."""
        self._started = time.monotonic()
        session: dict[str, Any] = {"devices": self.devices, "seconds": 0.0}
        if self.node is not None:
            session["node"] = self.node
        self.state["sessions"].append(session)

    def record(self, shard_name: str | None = None, sha: str | None = None) -> None:
        if self._started is not None:
            elapsed = time.monotonic() - self._started
            self.state["sessions"][-1]["seconds"] = elapsed
            self.state["device_seconds"] = self._before + self.devices * elapsed
        if shard_name is not None:
            self.state["sha256"][shard_name] = sha
        write_json(self.path, self.state)
        self._written = time.monotonic()

    def beat(self, every: float) -> None:
        """Record now and then while building: other nodes waiting on this one see it alive."""
        if time.monotonic() - self._written >= every:
            self.record()

    def finish(self) -> None:
        """This node has made all its shards: the session ends, ``done`` is recorded."""
        self.state["done"] = True
        self.record()
        self._started = None


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
    nodes: int = 1,
    node_rank: int = 0,
    patience: float = 120.0,
    lost_peer: Callable[[], str | None] | None = None,
    **supervise: Any,
) -> dict[str, Any]:
    """Make the missing shards with ``devices`` generators, then write the manifest; returns it.

    ``spawn_guard``: a context in which the generators are started (the launcher's blocks
    Ctrl-C in them: it alone handles it); ``supervise``: `Supervisor` settings (`supervision`).
    ``nodes``, ``node_rank``: this node's place when several nodes build the cache together (module
    docstring); ``patience`` (``dist.timeout``) bounds its waits for the others and
    ``lost_peer`` (`NodeGroup.lost_peer`, if the launchers are joined) names a lost node sooner.
    Raises `CacheBuildFailed` when the others' shards do not come."""
    folder = Path(spec.layout.dir)
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder, nodes, node_rank, log):
        try:
            return _build_locked(
                spec,
                worker,
                devices,
                slots,
                log,
                progress_stream,
                spawn_guard,
                nodes,
                node_rank,
                patience,
                lost_peer,
                **supervise,
            )
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            kept = len(spec.layout.present())
            raise CacheBuildFailed(
                f"the disk of --cache.dir {folder} is full ({e.strerror}): the {kept} finished shard(s) are kept and "
                "no file is half-written; free space and run the same command to go on"
            ) from None


@contextlib.contextmanager
def folder_lock(folder: Path, nodes: int, node_rank: int, log: Callable[[str], None]):
    """One builder at a time per cache folder (per node when several nodes share it): an
    ``fcntl.flock`` on ``.build.lock``, released by the kernel however the holder ends. A
    second build says who holds it and waits for it (then finds its shards made)."""
    path = folder / (".build.lock" if nodes == 1 else f".build-node{node_rank}.lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            log(f"--cache.dir {folder} is being built by {holder}; waiting for it to finish (Ctrl-C to stop)")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_locked(
    spec: CacheSpec,
    worker: WorkerSpec,
    devices: list[str],
    slots: int,
    log: Callable[[str], None],
    progress_stream,
    spawn_guard,
    nodes: int,
    node_rank: int,
    patience: float,
    lost_peer: Callable[[], str | None] | None,
    **supervise: Any,
) -> dict[str, Any]:
    me = node_rank
    layout = spec.layout
    folder = Path(layout.dir)
    owned = node_shards(list(range(layout.shards)), nodes, me)  # all shards on a single node
    sweep_temp_files(folder, set(owned))
    existing = read_manifest(folder)
    missing = layout.missing()
    if existing is not None and not missing:
        return existing  # a finished cache is reused as it is
    mine = node_shards(missing, nodes, me)
    progress = _Progress(spec, len(devices), progress_name(nodes, me), me if nodes > 1 else None)
    if mine:
        who = f"node {me} of {nodes} (shards s % {nodes} == {me}): " if nodes > 1 else ""
        log(
            f"building the cache in {folder}: {who}{len(mine)} of {layout.shards} shards to make "
            f"({sum(layout.shard_images(s) for s in mine)} of {layout.images} images) on {len(devices)} generator(s)"
        )
        progress.begin()
        supervisor = BuildSupervisor(worker, devices, units_of(layout, mine), slots, log=log, **supervise)
        writer = f"node{me}-{os.getpid()}"
        share = sum(layout.shard_images(s) for s in owned)
        bar = BuildProgress(share, share - sum(layout.shard_images(s) for s in mine), progress_stream)
        _make_shards(layout, mine, progress, supervisor, spawn_guard, bar, writer, min(5.0, patience / 4))
    progress.finish()
    if nodes > 1:
        _wait_for_nodes(layout, nodes, me, patience, lost_peer, log)
        if me != 0:
            return _wait_for_manifest(folder, patience, lost_peer)
    return _write_manifest(layout, spec, nodes)


def units_of(layout: Layout, shards: list[int]) -> list[int]:
    return [u for s in shards for u in layout.shard_units_of(s)]


def _make_shards(
    layout: Layout,
    missing: list[int],
    progress: _Progress,
    supervisor: BuildSupervisor,
    spawn_guard,
    bar: BuildProgress,
    writer_name: str | None = None,
    beat_every: float = 5.0,
) -> None:
    writer = ShardWriter(layout, writer_name)
    remaining = len(missing)
    try:
        with spawn_guard():
            supervisor.start()
        queue = supervisor.queues[0]
        while remaining:
            supervisor.poll(1.0, extra=[queue.filled])
            progress.beat(beat_every)
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
        with contextlib.suppress(OSError):  # a full disk: the last complete record stays
            progress.record()


def _peek(path: Path) -> str | None:
    """A file's text, or None if it is absent or unreadable (yet)."""
    try:
        return path.read_text()
    except OSError:
        return None


def _is_done(text: str | None) -> bool:
    try:
        return bool(text) and json.loads(text).get("done") is True
    except ValueError:
        return False


def _wait_for_nodes(
    layout: Layout, nodes: int, me: int, patience: float, lost_peer: Callable[[], str | None] | None, log
) -> None:
    """Until every shard exists and every other node has recorded that it made its shards.

    Bounded: ``patience`` seconds without any new shard or progress record of another node
    (they record every few seconds while building) end the wait with `CacheBuildFailed`."""
    folder = Path(layout.dir)
    peers = [j for j in range(nodes) if j != me]
    seen: tuple | None = None
    since = time.monotonic()
    any_sign, said = False, False
    while True:
        missing = layout.missing()
        texts = {j: _peek(folder / progress_name(nodes, j)) for j in peers}
        if not missing and all(_is_done(t) for t in texts.values()):
            return
        if not said:
            log(
                f"node {me} made its shards; waiting for the other nodes ({len(missing)} of {layout.shards} still to come)"
            )
            said = True
        lost = lost_peer() if lost_peer is not None else None
        if lost is not None:
            raise CacheBuildFailed(f"{lost} while the nodes built the cache in {folder}; start them all again to go on")
        any_sign = any_sign or any(t is not None for t in texts.values())
        now, snapshot = time.monotonic(), (tuple(missing), tuple(texts.values()))
        if snapshot != seen:
            seen, since = snapshot, now
        elif now - since > patience:
            if not any_sign:
                raise CacheBuildFailed(
                    f"node {me} made its shards, but no other node's shard or progress appeared in --cache.dir "
                    f"{folder} within {patience:.0f} s (--dist.timeout): cache.dir must be a folder shared by all "
                    "nodes, and every node must run the build"
                )
            late = sorted({s % nodes for s in missing} | {j for j, t in texts.items() if not _is_done(t)})
            raise CacheBuildFailed(
                f"no new shard or progress from node(s) {', '.join(map(str, late))} in --cache.dir {folder} for "
                f"{patience:.0f} s (--dist.timeout): is it still running? the shards made are kept; start every "
                "node again to go on"
            )
        time.sleep(max(0.05, min(1.0, patience / 10)))


def _wait_for_manifest(folder: Path, patience: float, lost_peer: Callable[[], str | None] | None) -> dict[str, Any]:
    """Node 0's manifest, which it writes as soon as every shard exists (bounded by ``patience``)."""
    deadline = time.monotonic() + patience
    while (manifest := read_manifest(folder)) is None:
        lost = lost_peer() if lost_peer is not None else None
        if lost is not None:
            raise CacheBuildFailed(f"{lost} before it wrote the cache's manifest.json in {folder}")
        if time.monotonic() > deadline:
            raise CacheBuildFailed(
                f"every shard is in --cache.dir {folder} but node 0 wrote no manifest.json within {patience:.0f} s "
                "(--dist.timeout): is node 0 still running?"
            )
        time.sleep(max(0.05, min(0.5, patience / 10)))
    return manifest


def _write_manifest(layout: Layout, spec: CacheSpec, nodes: int = 1) -> dict[str, Any]:
    """The manifest, from every progress file in the folder: the sum of their device-seconds
    (all nodes, all sessions) and their shards' sha256."""
    states = all_progress(layout.dir)
    sha: dict[str, str] = {}
    for state in states.values():
        sha.update(state.get("sha256", {}))
    ours = [states.get(progress_name(nodes, k), {}) for k in range(nodes)]  # this build's nodes
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
            "device_seconds": sum(float(state.get("device_seconds", 0.0)) for state in states.values()),
            "devices": sum(int(state.get("devices", 0)) for state in ours),  # over all nodes
            "nodes": nodes,
            "sessions": [session for state in states.values() for session in state.get("sessions", [])],
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(Path(layout.dir) / MANIFEST, manifest)
    return manifest
