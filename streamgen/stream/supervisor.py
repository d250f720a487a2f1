"""The supervisor: owns the generator processes, the queues and the ledger of units.

It runs in the launcher's main thread. Each trainer rank r has a `SlotQueue` and a ledger of
the units it owns (``u = r + k*T``). The supervisor hands every idle generator one job
``(rank, slot, unit)``: the next unit of the hungriest rank, and a FREE slot of that rank's
queue which it claims itself; the generator idle the longest is served first, so that
generators faster than their trainers share the work. When a generator dies (an exception, an out-of-memory error,
SIGKILL), the supervisor knows its one job: if the slot was not committed it is freed and the
unit goes back to the rank's ledger to be made again; then the generator is restarted with
exponential backoff.

Watchdog: a generator that delivers nothing in time (a wedged CUDA context, a process stopped
or stuck in the kernel) is killed with SIGKILL, which also ends a stopped process, and handled
as a crash. "In time" is ``startup_timeout`` from its start until it is ready (loading and
compiling can take minutes), then per unit ``hang_timeout`` if given, else derived from its own
recent unit times (`unit_timeout`); its first unit, before any time is measured, gets the
startup allowance.

Restart budget: a generator may fail at most ``max_restarts`` times within any
``restart_window`` seconds (`RestartBudget`). One that fails more often is retired: the run
goes on with the others. When none is left, `poll` raises `GeneratorFailed` with the last
error and traceback; the launcher then stops the trainers (with a checkpoint).

Exactly once: a unit is handed out once, except after a failure in which it was provably not
delivered (its slot still WRITING), so every unit reaches its rank's consumer exactly once. A
hung generator is dead (joined) before its slot is reclaimed, so it cannot commit it later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import multiprocessing as mp
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from streamgen.plan.samples import UnitCursor, rank_unit
from streamgen.stream.queue import FREE, Doorbell, SlotQueue
from streamgen.stream.worker import GeneratorStats, WorkerSpec, worker_main

SPAWN = mp.get_context("spawn")

HANG_FLOOR = 60.0  # seconds: the least a derived unit timeout allows (scheduler noise, a slow disk)
HANG_FACTOR = 10.0  # a derived unit timeout is this many times a generator's median unit time
UNIT_TIMES = 32  # recent unit times kept per generator for that median


class GeneratorFailed(RuntimeError):
    """Every generator was retired (failed too often); the message holds the last traceback."""


def unit_timeout(
    unit_times: list[float] | deque, hang_timeout: float | None, startup_timeout: float, floor: float = HANG_FLOOR
) -> float:
    """Seconds a generator may take for one unit before the watchdog kills it.

    ``hang_timeout`` if given; else ``HANG_FACTOR`` x the median of its recent unit times,
    at least ``floor``; before any unit time is measured, the generous ``startup_timeout``.
    The median ignores the odd slow unit (redraws, a checkpoint on the same disk).
    """
    if hang_timeout is not None:
        return hang_timeout
    if not unit_times:
        return startup_timeout
    return max(floor, HANG_FACTOR * statistics.median(unit_times))


class RestartBudget:
    """At most ``limit`` restarts within any ``window`` seconds: failures older than the
    window are forgiven, so rare transient faults never add up to a stop over days."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._failures: deque[float] = deque()

    def spend(self, now: float) -> bool:
        """Record a failure at ``now``; True if a restart is still allowed."""
        self._failures.append(now)
        while self._failures and self._failures[0] <= now - self.window:
            self._failures.popleft()
        return len(self._failures) <= self.limit

    @property
    def recent(self) -> int:
        """Failures within the window, as of the last `spend`."""
        return len(self._failures)


class RankLedger:
    """The units of one rank still to make: resumed cursor first, redone units before new ones."""

    def __init__(self, cursor: UnitCursor) -> None:
        self.rank, self.world = cursor.rank, cursor.world
        self._pending: Iterator[int] = cursor.pending()
        self._redo: list[int] = []  # a min-heap of rank-local indices to make again

    def take(self) -> int:
        """The next unit (global id) this rank needs made."""
        k = heapq.heappop(self._redo) if self._redo else next(self._pending)
        return rank_unit(self.rank, self.world, k)

    def give_back(self, unit: int) -> None:
        heapq.heappush(self._redo, (unit - self.rank) // self.world)


@dataclass
class _Generator:
    index: int
    device: str
    budget: RestartBudget
    process: object = None
    conn: object = None
    job: tuple[int, int, int] | None = None  # (rank, slot, unit) being made
    ready: bool = False
    life: int = 0
    restart_at: float | None = None
    last_error: str = ""
    retired: bool = False
    started_at: float = 0.0  # when this life was spawned
    job_since: float = 0.0  # when the current job was handed out
    idle_since: float = 0.0  # when it last finished a job: the longest idle is served first
    unit_times: deque = field(default_factory=lambda: deque(maxlen=UNIT_TIMES))
    hung: str = ""  # why the watchdog killed it, if it did

    @property
    def name(self) -> str:
        return f"generator {self.index} ({self.device})"


class Supervisor:
    """Generator processes + per-rank queues + ledgers. Use as a context manager: it cleans up.

    ``max_restarts`` within ``restart_window`` seconds, ``restart_backoff``: the restart budget;
    ``hang_timeout`` (None: derived, never below ``hang_floor``) and ``startup_timeout``: the
    watchdog. See the module docstring.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        devices: list[str],
        cursors: list[UnitCursor],
        slots: int,
        max_restarts: int = 3,
        restart_backoff: float = 2.0,
        restart_window: float = 3600.0,
        hang_timeout: float | None = None,
        startup_timeout: float = 1800.0,
        hang_floor: float = HANG_FLOOR,
        worker: Callable = worker_main,
        log: Callable[[str], None] = print,
        spawn_guard: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.spec, self.worker, self.log = spec, worker, log
        self.spawn_guard = spawn_guard  # the context every generator (restarts too) is started in
        self.max_restarts, self.restart_backoff, self.restart_window = max_restarts, restart_backoff, restart_window
        self.hang_timeout, self.startup_timeout, self.hang_floor = hang_timeout, startup_timeout, hang_floor
        self.freed = Doorbell()  # consumers ring it when they free a slot
        self.queues = [
            SlotQueue(slots, spec.unit_size, spec.out_resolution, self.freed, f"streamgen-rank{c.rank}")
            for c in cursors
        ]
        self.ledgers = [RankLedger(c) for c in cursors]
        self.stats = GeneratorStats(len(devices))
        self.generators = [_Generator(i, d, RestartBudget(max_restarts, restart_window)) for i, d in enumerate(devices)]
        self.failed: str | None = None
        self._served = [0] * len(cursors)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        for g in self.generators:
            self._start(g)

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(self.failed or "the run is over")

    def _start(self, g: _Generator) -> None:
        parent, child = SPAWN.Pipe()
        spec = dataclasses.replace(self.spec, index=g.index, life=g.life, device=g.device)
        g.process = SPAWN.Process(
            target=self.worker, args=(spec, child, self.queues, self.stats), name=f"streamgen-generator{g.index}"
        )
        g.conn, g.ready, g.job, g.restart_at = parent, False, None, None
        try:
            with self.spawn_guard():  # the launcher's: children never see its Ctrl-C
                g.process.start()
        finally:
            child.close()
        g.started_at, g.hung = time.monotonic(), ""

    def close_queues(self, reason: str) -> None:
        """Consumers raise `StreamClosed(reason)` at their next wait (first reason wins)."""
        for q in self.queues:
            if not q.closed:
                q.close(reason)

    def shutdown(self, reason: str = "the run is over", grace: float = 5.0) -> None:
        """Close the queues and stop every generator (politely, then by force)."""
        self.close_queues(reason)
        for g in self.generators:
            if g.process is not None and g.process.is_alive():
                try:
                    g.conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + grace
        for g in self.generators:
            if g.process is None or g.process.pid is None:  # never started (interrupted spawn)
                g.process = None
                continue
            g.process.join(max(0.0, deadline - time.monotonic()))
            if g.process.is_alive():
                g.process.kill()
                g.process.join(5)
            g.conn.close()
            g.process = None

    # -- the loop -----------------------------------------------------------------------------

    def poll(self, timeout: float = 1.0, extra: list | None = None) -> list:
        """Dispatch jobs, wait for events (or ``extra`` objects) up to ``timeout``, handle them.

        Returns the objects of ``extra`` that became ready. Raises `GeneratorFailed` once every
        generator is retired.
        """
        if self.failed:
            raise GeneratorFailed(self.failed)
        self._restart_due()
        self._dispatch()
        waitables: list = [self.freed, *(extra or [])]
        for g in self.generators:
            if g.process is not None:
                waitables += [g.conn, g.process.sentinel]
        wake = self._next_wake()
        if wake is not None:
            timeout = max(0.0, min(timeout, wake - time.monotonic()))
        ready = wait(waitables, timeout)
        if self.freed in ready:
            self.freed.drain()
        for g in self.generators:
            if g.process is None:
                continue
            if g.conn in ready:
                self._receive(g)
            if g.process is not None and not g.process.is_alive():
                self._on_death(g)
        self._watch()
        if self.failed:
            raise GeneratorFailed(self.failed)
        self._dispatch()
        return [x for x in (extra or []) if x in ready]

    def _receive(self, g: _Generator) -> None:
        try:
            while g.conn.poll():
                message = g.conn.recv()
                kind = message[0]
                if kind == "ready":
                    g.ready = True
                    self.log(f"{g.name} ready in {message[1]:.1f} s")
                elif kind == "done":
                    g.unit_times.append(time.monotonic() - g.job_since)
                    g.job, g.idle_since = None, time.monotonic()
                elif kind == "error":
                    g.last_error = message[1]
        except (EOFError, OSError):
            pass  # it died; the sentinel tells

    # -- the watchdog -------------------------------------------------------------------------

    def _deadline(self, g: _Generator) -> float | None:
        """When ``g`` must have made progress by, or None if it owes nothing now."""
        if g.process is None:
            return None
        if not g.ready:
            return g.started_at + self.startup_timeout
        if g.job is None:
            return None  # idle: every queue is full, it waits for us
        return g.job_since + unit_timeout(g.unit_times, self.hang_timeout, self.startup_timeout, self.hang_floor)

    def _next_wake(self) -> float | None:
        times = [g.restart_at for g in self.generators if g.restart_at is not None]
        times += [d for g in self.generators if (d := self._deadline(g)) is not None]
        return min(times, default=None)

    def _watch(self) -> None:
        """Kill every generator past its deadline (SIGKILL ends a stopped process too) and
        handle it as a crash: its unit is made again, it is restarted or retired."""
        for g in self.generators:
            deadline = self._deadline(g)
            if deadline is None or time.monotonic() < deadline:
                continue
            self._receive(g)  # a "done" may have come in just now
            deadline = self._deadline(g)
            now = time.monotonic()
            if deadline is None or now < deadline:
                continue
            if g.ready:
                rank, _, unit = g.job
                limit = unit_timeout(g.unit_times, self.hang_timeout, self.startup_timeout, self.hang_floor)
                g.hung = (
                    f"delivered nothing for {now - g.job_since:.0f} s (unit {unit} of rank {rank}; "
                    f"timeout {limit:.0f} s, --stream.hang_timeout)"
                )
            else:
                g.hung = (
                    f"was not ready {now - g.started_at:.0f} s after its start (--stream.startup_timeout "
                    f"{self.startup_timeout:g})"
                )
            g.process.kill()
            self._on_death(g)

    # -- failures -----------------------------------------------------------------------------

    def _on_death(self, g: _Generator) -> None:
        g.process.join()
        self._receive(g)
        code = g.process.exitcode
        redo = None
        if g.job is not None:
            rank, slot, unit = g.job
            if self.queues[rank].reclaim(slot, unit):
                self.ledgers[rank].give_back(unit)
                redo = unit
        g.conn.close()
        g.process, g.job, g.ready = None, None, False
        self.stats.add(g.index, "restarts", 1)
        if g.hung:
            cause = f"the watchdog killed it: it {g.hung}"
            what = f"{g.name} hung: it {g.hung}; killed"
        else:
            cause = g.last_error.strip() or (
                f"killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
            )
            what = f"{g.name} died ({cause.splitlines()[-1]})"
        g.last_error, g.hung = "", ""
        again = f"; unit {redo} will be made again" if redo is not None else ""
        now = time.monotonic()
        if not g.budget.spend(now):
            self._retire(g, cause)
            return
        delay = self.restart_backoff * 2 ** (g.budget.recent - 1)
        self.log(
            f"{what}{again}; restart {g.budget.recent}/{self.max_restarts} "
            f"(per {self.restart_window:g} s) in {delay:.1f} s"
        )
        g.restart_at = now + delay

    def _retire(self, g: _Generator, cause: str) -> None:
        """Too many failures within the window: the run goes on without it, if any is left."""
        g.retired, g.restart_at = True, None
        left = sum(not x.retired for x in self.generators)
        summary = (
            f"{g.name} failed {g.budget.recent} times within {self.restart_window:g} s "
            f"(--stream.max_restarts {self.max_restarts}, --stream.restart_window)"
        )
        if left:
            self.log(
                f"RETIRED {summary}; the run goes on with {left} of {len(self.generators)} generators. "
                f"Its last error: {cause.splitlines()[-1]}"
            )
        else:
            self.failed = f"{summary}: retired, and no generator is left. Its last error:\n{cause}"

    def _restart_due(self) -> None:
        now = time.monotonic()
        for g in self.generators:
            if g.restart_at is not None and now >= g.restart_at and not self.failed and not g.retired:
                g.life += 1
                self._start(g)

    def _dispatch(self) -> None:
        """Give each idle, ready generator the next unit of the rank with the fewest queued, the
        longest idle first: when generation outpaces the trainers, the work (and the generators'
        images/s on the dashboard) is shared, not left to whichever generator comes first."""
        for g in sorted(self.generators, key=lambda g: g.idle_since):
            if not g.ready or g.job is not None or g.process is None:
                continue
            rank = self._hungriest_rank()
            if rank is None:
                return  # every queue is full: generators wait on their job pipe
            unit = self.ledgers[rank].take()
            slot = self.queues[rank].claim(g.index, unit)
            try:
                g.conn.send((rank, slot, unit))
            except OSError:
                self.queues[rank].reclaim(slot, unit)
                self.ledgers[rank].give_back(unit)
                continue  # it died; the next poll restarts it
            g.job, g.job_since = (rank, slot, unit), time.monotonic()
            self._served[rank] += 1

    def _hungriest_rank(self) -> int | None:
        best, best_key = None, None
        for rank, q in enumerate(self.queues):
            free = q.count(FREE)
            if free == 0:
                continue
            key = (-free, self._served[rank])
            if best_key is None or key < best_key:
                best, best_key = rank, key
        return best

    # -- reporting ------------------------------------------------------------------------------

    @property
    def all_ready(self) -> bool:
        """Every generator that is not retired is ready for jobs."""
        return all(g.ready for g in self.generators if not g.retired)

    @property
    def active(self) -> int:
        """Generators not retired."""
        return sum(not g.retired for g in self.generators)
