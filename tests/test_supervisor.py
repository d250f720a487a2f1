"""Generators -> queues -> consumers with real processes: exactly once, through crashes."""

import os
import threading
import time

import pytest

from streamgen.classes import load_classes
from streamgen.config import GeneratorConfig
from streamgen.generator import FAULT_ENV, WorkerSpec
from streamgen.plan import SamplePlan, UnitCursor, unit_ids
from streamgen.prompts import PromptTemplate
from streamgen.queue import FILLED, SlotQueue, StreamClosed
from streamgen.supervisor import SPAWN, GeneratorFailed, Supervisor

UNIT = 8


def spec(unit_size: int = UNIT, resolution: int = 8) -> WorkerSpec:
    plan = SamplePlan(load_classes("imagenet100:10"), PromptTemplate.parse("c"), seed=3)
    return WorkerSpec(
        index=0,
        life=0,
        device="cpu",
        threads=1,
        model="fake",
        cfg=GeneratorConfig(batch_size=4),
        plan=plan,
        unit_size=unit_size,
        out_resolution=resolution,
    )


def supervisor(generators: int, ranks: int = 1, slots: int = 2, **kw) -> Supervisor:
    cursors = [UnitCursor(r, ranks) for r in range(ranks)]
    return Supervisor(spec(), ["cpu"] * generators, cursors, slots, log=lambda m: None, **kw)


def consume(queue: SlotQueue, units: int | set, out: list) -> None:
    """Consume until all of the first ``units`` units (or the given set) have arrived; they
    arrive out of order around a crash, so a few later ones come too."""
    wanted = set(range(units)) if isinstance(units, int) else units
    while not wanted.issubset(u for u, _, _ in out):
        slot = queue.get()
        view = queue.view(slot)
        out.append((queue.unit(slot), view.ids.clone().numpy(), view.labels.clone().numpy()))
        queue.release(slot)


def run_until(sup: Supervisor, done, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the stream stalled"
        sup.poll(0.05)


def check_exactly_once(records: list, units: int) -> None:
    got = [unit for unit, _, _ in records]
    assert len(got) == len(set(got)), "a unit was delivered twice"
    assert set(range(units)) <= set(got), "a unit was lost"
    plan = spec().plan
    for unit, ids, labels in records:
        assert ids.tolist() == unit_ids(unit, UNIT).tolist()
        assert labels.tolist() == plan.labels(ids).tolist()


@pytest.mark.timeout(120)
def test_several_producers_one_consumer_small_queue():
    records: list = []
    with supervisor(generators=3, slots=2) as sup:
        consumer = threading.Thread(target=consume, args=(sup.queues[0], 150, records))
        consumer.start()
        run_until(sup, lambda: not consumer.is_alive(), 90)
    check_exactly_once(records, 150)


def _consumer_process(queue: SlotQueue, rank: int, ranks: int, units: int, results) -> None:
    """Consume until every one of this rank's first ``units`` units has arrived (units arrive
    out of order, so a few later ones come too); report everything consumed."""
    wanted = {rank + k * ranks for k in range(units)}
    records: list = []
    while not wanted.issubset(u for u, _ in records):
        slot = queue.get()
        records.append((queue.unit(slot), queue.view(slot).ids.tolist()))
        queue.release(slot)
    results.put((rank, records))


@pytest.mark.timeout(240)
def test_four_producers_two_consumers_ten_thousand_samples():
    units_per_rank = 640  # 2 ranks x 640 units x 8 = 10,240 samples, through 3-slot queues
    results = SPAWN.Queue()
    with supervisor(generators=4, ranks=2, slots=3) as sup:
        consumers = [
            SPAWN.Process(target=_consumer_process, args=(sup.queues[r], r, 2, units_per_rank, results))
            for r in range(2)
        ]
        for c in consumers:
            c.start()
        run_until(sup, lambda: all(not c.is_alive() for c in consumers), 200)
        per_rank = dict(results.get(timeout=10) for _ in range(2))
    all_ids = [i for rank in per_rank.values() for _, ids in rank for i in ids]
    assert len(all_ids) == len(set(all_ids)), "a sample was consumed twice"
    assert set(range(2 * units_per_rank * UNIT)) <= set(all_ids), "a sample was lost"
    for rank, records in per_rank.items():
        assert all(unit % 2 == rank for unit, _ in records)  # each rank gets only its own units
        assert all(ids == unit_ids(unit, UNIT).tolist() for unit, ids in records)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["kill:1:3", "raise:0:2"])
def test_a_crashed_generator_is_restarted_and_nothing_is_lost(monkeypatch, fault):
    monkeypatch.setenv(FAULT_ENV, fault)
    records: list = []
    with supervisor(generators=2, slots=2, restart_backoff=0.1) as sup:
        run_until(sup, lambda: sup.all_ready, 60)  # both generators take units from the start
        consumer = threading.Thread(target=consume, args=(sup.queues[0], 100, records))
        consumer.start()
        run_until(sup, lambda: not consumer.is_alive(), 150)
        # the failure was noticed and the generator came back (its exit may lag the stream)
        run_until(sup, lambda: sup.stats.total("restarts") == 1 and sup.all_ready, 60)
    check_exactly_once(records, 100)


@pytest.mark.timeout(180)
def test_too_many_failures_stop_the_stream_with_the_workers_traceback(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "raise:0:0:99")  # generator 0 fails in every life
    errors: list = []

    def consumer(queue):
        try:
            while True:
                queue.release(queue.get())
        except StreamClosed as e:
            errors.append(str(e))

    sup = supervisor(generators=1, slots=2, max_restarts=2, restart_backoff=0.05)
    with pytest.raises(GeneratorFailed, match="failed 3 times"):
        with sup:
            thread = threading.Thread(target=consumer, args=(sup.queues[0],))
            thread.start()  # waits on an empty queue whose only producer keeps dying
            run_until(sup, lambda: False, 150)
    thread.join(10)
    assert not thread.is_alive(), "the consumer hung on a queue with no producer left"
    assert "Traceback" in errors[0] and "RuntimeError: injected fault" in errors[0]
    assert all(g.process is None for g in sup.generators)


@pytest.mark.timeout(120)
def test_resumed_ledger_skips_consumed_units():
    cursor = UnitCursor(0, 1)
    for k in (0, 1, 2, 4, 7):
        cursor.mark(k)
    records: list = []
    sup = Supervisor(spec(), ["cpu"] * 2, [cursor], 2, log=lambda m: None)
    with sup:
        consumer = threading.Thread(target=consume, args=(sup.queues[0], {3, 5, 6, 8}, records))
        consumer.start()
        run_until(sup, lambda: not consumer.is_alive(), 90)
    got = [u for u, _, _ in records]
    assert len(got) == len(set(got)) and not {0, 1, 2, 4, 7} & set(got)
    assert {3, 5, 6, 8} <= set(got)


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(120)
def test_a_full_queue_blocks_producers_without_busy_waiting():
    with supervisor(generators=2, slots=2) as sup:
        run_until(sup, lambda: sup.all_ready and sup.queues[0].count(FILLED) == 2, 60)
        pids = [g.process.pid for g in sup.generators]
        before = [_cpu_seconds(p) for p in pids]
        started = time.process_time()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # nobody consumes: the queue stays full
            sup.poll(1.0)
        spent = [_cpu_seconds(p) - b for p, b in zip(pids, before)]
        assert max(spent) < 0.2, f"producers burnt {spent} CPU seconds while blocked"
        assert time.process_time() - started < 0.3  # and so did the supervisor
        assert sup.queues[0].count(FILLED) == 2 and all(g.process.is_alive() for g in sup.generators)
