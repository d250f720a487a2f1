"""Generators -> queues -> consumers with real processes: exactly once, through crashes."""

import os
import threading
import time

import pytest

from streamgen.config import GeneratorConfig
from streamgen.plan.classes import load_classes
from streamgen.plan.prompts import PromptTemplate
from streamgen.plan.samples import SamplePlan, UnitCursor, unit_ids
from streamgen.stream.queue import FILLED, SlotQueue, StreamClosed
from streamgen.stream.supervisor import SPAWN, GeneratorFailed, RestartBudget, Supervisor, unit_timeout
from streamgen.stream.worker import FAULT_ENV, WorkerSpec

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


def _slow_consume(queue: SlotQueue, units: int, seconds: float) -> None:
    for _ in range(units):
        slot = queue.get()
        time.sleep(seconds)  # a trainer slower than its generators
        queue.release(slot)


@pytest.mark.timeout(120)
def test_generators_faster_than_the_trainer_share_the_work():
    """Each freed slot goes to the generator idle the longest: with fast generators and a slow
    trainer all of them make units (before, generator 0 took every slot and the others showed
    0 images/s), and each unit still arrives exactly once."""
    with supervisor(generators=3, slots=2) as sup:
        consumer = threading.Thread(target=_slow_consume, args=(sup.queues[0], 60, 0.02))
        consumer.start()
        run_until(sup, lambda: not consumer.is_alive(), 90)
        units = sup.stats.table[:, sup.stats.FIELDS.index("units")]
    assert units.sum() >= 60
    assert units.min() >= 10, units  # an even share is 20 each


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


# -- the watchdog and the restart budget ---------------------------------------------------------


def test_unit_timeout_is_derived_from_the_generators_own_unit_times():
    # no unit measured yet (loading, compiling): the startup allowance
    assert unit_timeout([], None, startup_timeout=1800) == 1800
    # then 10x the median unit time, never below the floor; the odd slow unit does not count
    assert unit_timeout([1.0, 1.2, 40.0], None, 1800, floor=5) == pytest.approx(12.0)
    assert unit_timeout([0.01] * 5, None, 1800, floor=60) == 60
    # a number given by the user wins, from the first unit on
    assert unit_timeout([], 7.0, 1800) == 7.0 and unit_timeout([100.0], 7.0, 1800) == 7.0


def test_restart_budget_forgives_failures_older_than_the_window():
    budget = RestartBudget(limit=3, window=10.0)
    assert all(budget.spend(t) for t in (0.0, 11.0, 22.0, 33.0, 44.0))  # one failure per window, forever
    assert budget.recent == 1
    budget = RestartBudget(limit=3, window=10.0)
    assert [budget.spend(t) for t in (0.0, 1.0, 2.0, 3.0)] == [True, True, True, False]  # the 4th within 10 s
    budget = RestartBudget(limit=3, window=10.0)
    assert [budget.spend(t) for t in (0.0, 1.0, 2.0, 10.5)] == [True, True, True, True]  # the 1st has expired


def _consume_tracking_pending(queue: SlotQueue, units: int, out: list, pending: list) -> None:
    """`consume`, keeping the rank's cursor as a trainer does: ``pending`` gets the size of its
    set of units consumed above the low watermark after every unit."""
    cursor = UnitCursor(0, 1)
    while not set(range(units)).issubset(u for u, _, _ in out):
        slot = queue.get()
        view = queue.view(slot)
        out.append((queue.unit(slot), view.ids.clone().numpy(), view.labels.clone().numpy()))
        cursor.mark(queue.unit(slot))
        pending.append(len(cursor.done))
        queue.release(slot)


@pytest.mark.timeout(180)
def test_a_stopped_generator_is_killed_restarted_and_its_unit_made_again(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "stop:1:3")  # generator 1 SIGSTOPs itself while writing its 4th unit
    messages: list = []
    records: list = []
    pending: list = []
    cursors = [UnitCursor(0, 1)]
    sup = Supervisor(
        spec(), ["cpu"] * 2, cursors, 3, restart_backoff=0.1, hang_floor=2.0, startup_timeout=60, log=messages.append
    )
    with sup:
        run_until(sup, lambda: sup.all_ready, 60)
        consumer = threading.Thread(target=_consume_tracking_pending, args=(sup.queues[0], 300, records, pending))
        consumer.start()
        run_until(sup, lambda: not consumer.is_alive(), 120)
        run_until(sup, lambda: sup.all_ready, 60)  # it came back
        assert sup.stats.total("restarts") == 1
    check_exactly_once(records, 300)
    hung = [m for m in messages if "hung" in m]
    assert len(hung) == 1 and hung[0].startswith("generator 1 (cpu) hung: it delivered nothing for")
    assert "will be made again" in hung[0]
    # the derived timeout (10 x a few ms, floor 2 s) fired on time, not at the startup allowance
    waited = float(hung[0].split("delivered nothing for ")[1].split(" s")[0])
    assert 2 <= waited < 10
    # the hole the stopped generator left in the rank's stream was filled: the pending set of
    # the cursor drains (it grew only while the watchdog waited) instead of growing forever
    assert pending[-1] <= 3 + 2 and max(pending) < len(records)


def _never_ready(spec, conn, queues, stats) -> None:
    """A generator stuck while loading (a wedged driver call): it never says ready."""
    time.sleep(3600)


@pytest.mark.timeout(120)
def test_a_generator_stuck_in_startup_is_killed_and_the_last_one_retired_stops_the_stream():
    messages: list = []
    sup = Supervisor(
        spec(),
        ["cpu"],
        [UnitCursor(0, 1)],
        2,
        max_restarts=1,
        restart_backoff=0.1,
        startup_timeout=3.0,
        worker=_never_ready,
        log=messages.append,
    )
    started = time.monotonic()
    with pytest.raises(GeneratorFailed, match="failed 2 times within 3600 s") as failed:
        with sup:
            run_until(sup, lambda: False, 90)
    assert "was not ready 3 s after its start (--stream.startup_timeout 3)" in str(failed.value)
    assert "no generator is left" in str(failed.value)
    assert any(m.startswith("generator 0 (cpu) hung: it was not ready") for m in messages)
    assert time.monotonic() - started < 60
    assert all(g.process is None for g in sup.generators)


@pytest.mark.timeout(180)
def test_failures_spread_wider_than_the_restart_window_never_retire_a_generator(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "kill:0:2:4")  # 4 lives, each killed at its 3rd unit
    records: list = []
    # each restart waits 1.5 s, so two failures are always more than the 1 s window apart
    with supervisor(generators=1, slots=2, max_restarts=3, restart_window=1.0, restart_backoff=1.5) as sup:
        consumer = threading.Thread(target=consume, args=(sup.queues[0], 30, records))
        consumer.start()
        run_until(sup, lambda: not consumer.is_alive(), 150)
        assert sup.stats.total("restarts") == 4 and sup.active == 1
    check_exactly_once(records, 30)


def _consume_until(queue: SlotQueue, stop: threading.Event, out: list) -> None:
    """Consume everything, a little slower than generators make it, until ``stop`` is set."""

    def stopped() -> None:  # checked while waiting for a unit
        if stop.is_set():
            raise StreamClosed("stop")

    try:
        while not stop.is_set():
            slot = queue.get(poll=0.2, alive=stopped)
            view = queue.view(slot)
            out.append((queue.unit(slot), view.ids.clone().numpy(), view.labels.clone().numpy()))
            queue.release(slot)
            time.sleep(0.005)
    except StreamClosed:
        pass


@pytest.mark.timeout(180)
def test_a_generator_failing_too_often_within_the_window_is_retired_and_the_run_goes_on(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "kill:0:2:99")  # generator 0 is killed at its 3rd unit in every life
    messages: list = []
    records: list = []
    stop = threading.Event()
    sup = Supervisor(
        spec(), ["cpu"] * 2, [UnitCursor(0, 1)], 2, max_restarts=3, restart_backoff=0.1, log=messages.append
    )
    with sup:
        consumer = threading.Thread(target=_consume_until, args=(sup.queues[0], stop, records))
        consumer.start()
        try:
            run_until(sup, lambda: sup.active == 1, 120)
            at_retirement = len(records)
            run_until(sup, lambda: len(records) >= at_retirement + 100, 60)  # generator 1 alone goes on
        finally:
            stop.set()
            consumer.join(10)
        assert sup.generators[0].process is None and sup.generators[1].process.is_alive()
        assert sup.stats.total("restarts") == 4
    check_exactly_once(records, len(records) - 10)  # the last few may still be out of order
    retired = [m for m in messages if m.startswith("RETIRED")]
    assert retired == [
        "RETIRED generator 0 (cpu) failed 4 times within 3600 s (--stream.max_restarts 3, --stream.restart_window); "
        "the run goes on with 1 of 2 generators. Its last error: killed by signal 9"
    ]
