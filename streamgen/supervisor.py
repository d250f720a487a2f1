"""The supervisor: owns the generator processes, the queues and the ledger of units.

It runs in the launcher's main thread. Each trainer rank r has a `SlotQueue` and a ledger of
the units it owns (``u = r + k*T``). The supervisor hands every idle generator one job
``(rank, slot, unit)``: the next unit of the hungriest rank, and a FREE slot of that rank's
queue which it claims itself. When a generator dies (an exception, an out-of-memory error,
SIGKILL), the supervisor knows its one job: if the slot was not committed it is freed and the
unit goes back to the rank's ledger to be made again; then the generator is restarted with
exponential backoff. After ``max_restarts`` failures of one generator the queues are closed
with the worker's own error and traceback, which every trainer raises.

Exactly once: a unit is handed out once, except after a failure in which it was provably not
delivered (its slot still WRITING), so every unit reaches its rank's consumer exactly once.
"""

from __future__ import annotations

import dataclasses
import heapq
import multiprocessing as mp
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait

from streamgen.generator import GeneratorStats, WorkerSpec, worker_main
from streamgen.plan import UnitCursor, rank_unit
from streamgen.queue import FREE, Doorbell, SlotQueue

SPAWN = mp.get_context("spawn")


class GeneratorFailed(RuntimeError):
    """A generator failed more often than allowed; the message holds its last traceback."""


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
    process: object = None
    conn: object = None
    job: tuple[int, int, int] | None = None  # (rank, slot, unit) being made
    ready: bool = False
    life: int = 0
    failures: int = 0
    restart_at: float | None = None
    last_error: str = ""


class Supervisor:
    """Generator processes + per-rank queues + ledgers. Use as a context manager: it cleans up."""

    def __init__(
        self,
        spec: WorkerSpec,
        devices: list[str],
        cursors: list[UnitCursor],
        slots: int,
        max_restarts: int = 3,
        restart_backoff: float = 2.0,
        worker: Callable = worker_main,
        log: Callable[[str], None] = print,
    ) -> None:
        self.spec, self.worker, self.log = spec, worker, log
        self.max_restarts, self.restart_backoff = max_restarts, restart_backoff
        self.freed = Doorbell()  # consumers ring it when they free a slot
        self.queues = [
            SlotQueue(slots, spec.unit_size, spec.out_resolution, self.freed, f"streamgen-rank{c.rank}")
            for c in cursors
        ]
        self.ledgers = [RankLedger(c) for c in cursors]
        self.stats = GeneratorStats(len(devices))
        self.generators = [_Generator(i, d) for i, d in enumerate(devices)]
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
        self.shutdown()

    def _start(self, g: _Generator) -> None:
        parent, child = SPAWN.Pipe()
        spec = dataclasses.replace(self.spec, index=g.index, life=g.life, device=g.device)
        g.process = SPAWN.Process(
            target=self.worker, args=(spec, child, self.queues, self.stats), name=f"streamgen-generator{g.index}"
        )
        g.process.start()
        child.close()
        g.conn, g.ready, g.job, g.restart_at = parent, False, None, None

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
            if g.process is None:
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

        Returns the objects of ``extra`` that became ready. Raises `GeneratorFailed` once a
        generator has failed more than ``max_restarts`` times.
        """
        self._restart_due()
        self._dispatch()
        waitables: list = [self.freed, *(extra or [])]
        for g in self.generators:
            if g.process is not None:
                waitables += [g.conn, g.process.sentinel]
        restart_times = [g.restart_at for g in self.generators if g.restart_at is not None]
        if restart_times:
            timeout = max(0.0, min(timeout, min(restart_times) - time.monotonic()))
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
                    self.log(f"generator {g.index} ({g.device}) ready in {message[1]:.1f} s")
                elif kind == "done":
                    g.job = None
                elif kind == "error":
                    g.last_error = message[1]
        except (EOFError, OSError):
            pass  # it died; the sentinel tells

    def _on_death(self, g: _Generator) -> None:
        g.process.join()
        self._receive(g)
        code = g.process.exitcode
        if g.job is not None:
            rank, slot, unit = g.job
            if self.queues[rank].reclaim(slot, unit):
                self.ledgers[rank].give_back(unit)
        g.conn.close()
        g.process, g.job, g.ready = None, None, False
        g.failures += 1
        self.stats.add(g.index, "restarts", 1)
        cause = g.last_error.strip() or (
            f"killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        )
        if g.failures > self.max_restarts:
            self.failed = (
                f"generator {g.index} ({g.device}) failed {g.failures} times; giving up. Its last error:\n{cause}"
            )
            self.close_queues(self.failed)
            return
        delay = self.restart_backoff * 2 ** (g.failures - 1)
        self.log(
            f"generator {g.index} died ({cause.splitlines()[-1]}); restart {g.failures}/{self.max_restarts} in {delay:.0f} s"
        )
        g.restart_at = time.monotonic() + delay
        g.last_error = ""

    def _restart_due(self) -> None:
        now = time.monotonic()
        for g in self.generators:
            if g.restart_at is not None and now >= g.restart_at and not self.failed:
                g.life += 1
                self._start(g)

    def _dispatch(self) -> None:
        """Give each idle, ready generator the next unit of the rank with the fewest queued."""
        for g in self.generators:
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
            g.job = (rank, slot, unit)
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
        return all(g.ready for g in self.generators)
