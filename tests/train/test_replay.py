"""The replay buffer (--stream.reuse K / auto): schedules, buffer, hand-off, sidecars, and end to end."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import read_scalars

from streamgen.config import RunConfig, apply, validate
from streamgen.errors import UsageError
from streamgen.stream.queue import FREE, Doorbell, SlotQueue
from streamgen.train.replay import (
    AutoSchedule,
    ReplayBuffer,
    ReplaySettings,
    ReuseSchedule,
    id_ranges,
    parse_ranges,
    read_audit,
    uses_per_id,
)
from streamgen.train.stream_data import NO_UNIT, ReplayDataModule, StreamDataModule

META = {"classes": "abc", "class_spec": "x", "seed": 0, "unit_size": 4, "world": 1}


def simulate(batch: int, reuse: int, steps: int, capacity: int, seed: int = 0, rank: int = 0):
    """The schedule alone over a run, units arriving when asked: (ids per step, fresh per step, peak size)."""
    schedule = ReuseSchedule(batch, reuse, steps, capacity, seed, rank)
    buffer = ReplayBuffer(capacity, 2)
    unit, batches, fresh, peak = 0, [], [], 0
    for step in range(steps):
        if schedule.needs_unit(step):
            ids = torch.arange(unit * batch, (unit + 1) * batch)
            buffer.add(torch.zeros(batch, 3, 2, 2, dtype=torch.uint8), ids % 7, ids, reuse, evict=False)
            unit += 1
        draw = schedule.draw(buffer, step)
        taken = buffer.take(draw.slots)
        batches.append(taken["id"].tolist())
        fresh.append(taken["id"][: draw.fresh].tolist())
        peak = max(peak, len(buffer))
    return batches, fresh, peak


@pytest.mark.parametrize(
    "batch,reuse,steps,capacity",
    [(8, 4, 50, 44), (8, 4, 52, 200), (8, 3, 30, 100), (4, 16, 64, 400), (5, 3, 9, 40), (16, 2, 40, 1000)],
)
def test_reuse_k_uses_every_id_exactly_k_times_once_fresh_within_the_buffer(batch, reuse, steps, capacity):
    batches, fresh, peak = simulate(batch, reuse, steps, capacity)
    assert all(len(b) == batch and len(set(b)) == batch for b in batches)  # full batches, no id twice in one
    uses = {}
    for b in batches:
        for i in b:
            uses[i] = uses.get(i, 0) + 1
    assert set(uses.values()) == {reuse}  # exactly K uses, every id
    assert len(uses) == steps * batch // reuse  # the unique images a run of S steps buys
    flat_fresh = [i for f in fresh for i in f]
    assert flat_fresh == sorted(uses)  # each id fresh once, in arrival order, before any replay of it
    first_use = {}
    for step, b in enumerate(batches):
        for i in b:
            first_use.setdefault(i, step)
    assert all(first_use[i] == step for step, f in enumerate(fresh) for i in f)
    assert peak <= capacity  # never evicts: the buffer holds every sample with uses left


def test_reuse_k_steady_phase_takes_one_kth_fresh():
    schedule = ReuseSchedule(256, 4, 1000, 256 * 3 * 4 + 600, 0, 0)
    middle = [schedule.fresh_at(t) for t in range(schedule.ramp, schedule.drain_start)]
    assert set(middle) == {64} and schedule.fresh_before(1000) == 1000 * 256 // 4


def test_draws_are_deterministic_per_seed_and_rank():
    a, _, _ = simulate(8, 4, 40, 120, seed=1)
    assert a == simulate(8, 4, 40, 120, seed=1)[0]
    assert a != simulate(8, 4, 40, 120, seed=2)[0]
    assert a != simulate(8, 4, 40, 120, seed=1, rank=1)[0]


def test_a_full_buffer_evicts_the_oldest_first():
    buffer = ReplayBuffer(8, 2)
    for unit in range(3):
        ids = torch.arange(unit * 4, unit * 4 + 4)
        slots = buffer.add(torch.full((4, 3, 2, 2), unit, dtype=torch.uint8), ids, ids, 10**6, evict=True)
        buffer.take(slots)
    assert sorted(buffer.ids[buffer.occupied].tolist()) == list(range(4, 12))  # unit 0 left first
    buffer.add(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.arange(4), torch.arange(12, 16), 1, evict=True)
    assert sorted(buffer.ids[buffer.occupied].tolist()) == list(range(8, 16))
    with pytest.raises(RuntimeError, match="full"):  # reuse K never evicts: a sample would lose uses
        buffer.add(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.arange(4), torch.arange(16, 20), 1, evict=False)


def test_auto_replays_a_uniform_batch_of_distinct_used_samples():
    buffer, schedule = ReplayBuffer(16, 2), AutoSchedule(4, 0, 0)
    for unit in range(3):
        ids = torch.arange(unit * 4, unit * 4 + 4)
        buffer.add(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), ids, ids, 10**6, evict=True)
        draw = schedule.draw(buffer, unit, fresh_unit=True)
        assert buffer.ids[draw.slots].tolist() == ids.tolist() and draw.fresh == 4  # the unit as it came
        buffer.take(draw.slots)
    draw = schedule.draw(buffer, 3, fresh_unit=False)
    assert draw.fresh == 0 and len(set(buffer.ids[draw.slots].tolist())) == 4
    assert draw.slots.tolist() == schedule.draw(buffer, 3, fresh_unit=False).slots.tolist()


def test_id_ranges_round_trip():
    assert id_ranges([7, 1, 2, 3]) == "1-3,7" and id_ranges([]) == "-"
    assert parse_ranges("1-3,7") == [1, 2, 3, 7] and parse_ranges("-") == []


# -- the data module ---------------------------------------------------------------------------


def make_queue(slots: int = 4) -> SlotQueue:
    return SlotQueue(slots, 4, 8, Doorbell())


def fill(q: SlotQueue, unit: int) -> None:
    slot = q.claim(0, unit)
    v = q.view(slot)
    v.images.fill_(unit % 256)
    v.labels.fill_(unit % 10)
    v.ids.copy_(torch.arange(unit * 4, unit * 4 + 4))
    q.commit(slot)


def replay_module(q, tmp_path: Path, settings: ReplaySettings, log: str = "consumed.tsv") -> ReplayDataModule:
    tmp_path.mkdir(parents=True, exist_ok=True)
    dm = ReplayDataModule(
        q,
        settings,
        tmp_path / "checkpoints" / "replay",
        rank=0,
        world=1,
        run_meta=META,
        crop=8,
        consumed_log=tmp_path / log,
    )
    dm.trainer = SimpleNamespace(global_step=0, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    dm.setup("fit")
    return dm


def train(dm: ReplayDataModule, q: SlotQueue, steps: range, made: list[int], limit: int = 10**9):
    """Run the hand-off for ``steps`` as Lightning would (one item per step), feeding the queue."""
    items = iter(dm.train_dataloader().dataset)
    out = []
    for step in steps:
        while q.count(FREE) and made[0] < limit:
            fill(q, made[0])
            made[0] += 1
        dm.trainer.global_step = step
        batch = dm.on_after_batch_transfer(next(items), 0)
        out.append((batch["id"].tolist(), batch["label"].tolist(), batch["fresh"]))
    return out


def test_hand_off_composes_batches_and_writes_the_audit_trail(tmp_path):
    q = make_queue()
    dm = replay_module(q, tmp_path, ReplaySettings(reuse=3, capacity=40, max_steps=12, seed=0))
    out = train(dm, q, range(12), [0])
    dm.teardown("fit")
    rows = read_audit(tmp_path / "consumed.tsv")
    assert [r[0] for r in rows] == list(range(12))
    assert [ids for ids, _, _ in out] == [r[2] + [i for i in ids if i not in r[2]] for r, (ids, _, _) in zip(rows, out)]
    assert all(label == [i // 4 % 10 for i in ids] for ids, label, _ in out)  # labels follow their images
    assert set(uses_per_id(rows).values()) == {3} and dm.fresh_images == 16
    assert [r[1] for r in rows if r[1] is not None] == [0, 1, 2, 3]  # each unit arrived once, in order
    assert dm.cursor.below == 4


def test_a_resumed_module_continues_exactly_as_the_uninterrupted_one(tmp_path):
    settings = ReplaySettings(reuse=4, capacity=60, max_steps=24, seed=3)
    q = make_queue()
    whole = train(replay_module(q, tmp_path / "a", settings), q, range(24), [0])

    q = make_queue()
    made = [0]
    first = replay_module(q, tmp_path / "b", settings)
    before = train(first, q, range(10), made)
    first.trainer.global_step = 10  # after step 9: what a checkpoint at step 10 holds
    state = first.state_dict()
    assert (tmp_path / "b" / "checkpoints" / "replay" / "step10-rank0.pt").is_file()

    q = make_queue()  # a new launcher: units not consumed are made again
    resumed = ReplayDataModule(
        q,
        ReplaySettings(reuse=4, capacity=60, max_steps=24, seed=3, resume_dir=str(tmp_path / "b" / "checkpoints")),
        tmp_path / "c" / "checkpoints" / "replay",
        rank=0,
        world=1,
        run_meta=META,
        crop=8,
    )
    resumed.trainer = SimpleNamespace(global_step=10, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    resumed.setup("fit")
    resumed.load_state_dict(state)
    made = [resumed.cursor.below]
    after = train(resumed, q, range(10, 24), made)
    assert before + after == whole


def test_auto_trains_on_the_buffer_instead_of_waiting(tmp_path):
    q = make_queue()
    dm = replay_module(q, tmp_path, ReplaySettings(reuse=None, capacity=12, max_steps=100, seed=0))
    fill(q, 0)
    items = iter(dm.train_dataloader().dataset)
    first = next(items)
    assert first["unit"] == 0
    dm.on_after_batch_transfer(first, 0)
    started = time.perf_counter()
    item = next(items)  # nothing in the queue: no wait, a buffer batch
    assert item["slot"] == NO_UNIT and time.perf_counter() - started < 0.5
    dm.trainer.global_step = 1
    out = dm.on_after_batch_transfer(item, 0)
    assert out["fresh"] == 0 and sorted(out["id"].tolist()) == [0, 1, 2, 3]
    fill(q, 1)
    item = next(items)
    assert item["unit"] == 1  # a fresh unit, as soon as it is ready
    dm.trainer.global_step = 2
    assert dm.on_after_batch_transfer(item, 0)["id"].tolist() == [4, 5, 6, 7]
    assert dm.stream.wait_seconds < 0.5


def test_reuse_1_is_the_plain_stream(tmp_path):
    from streamgen.launch.checks import Job

    cfg = apply(RunConfig(), {"stream.reuse": "1"})
    job = SimpleNamespace(cfg=cfg, replay_on_device=False)
    assert Job.replay(job) is None  # make_datamodule then builds StreamDataModule itself
    cfg = apply(RunConfig(), {"stream.reuse": "auto"})
    assert Job.replay(SimpleNamespace(cfg=cfg, replay_on_device=False)).reuse is None
    assert not issubclass(StreamDataModule, ReplayDataModule)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"stream.reuse": "0"}, "--stream.reuse must be a whole number >= 1 or auto"),
        ({"stream.reuse": "often"}, "--stream.reuse must be a whole number >= 1 or auto"),
        ({"stream.reuse": "auto", "stream.buffer": 100}, "--stream.buffer 100 is smaller than one batch"),
        ({"stream.reuse": "4", "stream.buffer": 1000}, "raise it to at least 1284"),
        ({"stream.reuse": "3", "train.max_steps": 100}, "use a max_steps that is a multiple of 3 (e.g. 99)"),
        ({"stream.reuse": "auto", "source": "cache"}, "a cache run reuses its images by epochs"),
    ],
)
def test_bad_replay_settings_are_one_line(flags, message):
    with pytest.raises(UsageError, match="^" + ".*" + message.replace("(", r"\(").replace(")", r"\)")):
        validate(apply(RunConfig(), flags))


def test_resume_with_another_reuse_or_without_sidecars_is_refused(tmp_path):
    from streamgen.launch.checks import check_resume_replay

    ckpt = tmp_path / "checkpoints" / "step0000010.ckpt"
    info = {"reuse": "4", "buffer": 8192, "max_steps": 100, "sidecar": "step10-rank0.pt"}
    positions = [{"rank": 0, "replay": info}]
    cfg = apply(RunConfig(), {"stream.reuse": "auto"})
    with pytest.raises(UsageError, match="trained with --stream.reuse 4; resume with it"):
        check_resume_replay(str(ckpt), cfg, positions)
    with pytest.raises(UsageError, match="--stream.reuse 1; resume with it"):
        check_resume_replay(str(ckpt), cfg, [{"rank": 0}])  # a plain stream's checkpoint
    cfg = apply(RunConfig(), {"stream.reuse": "4", "stream.buffer": 8192, "train.max_steps": 100})
    with pytest.raises(UsageError, match="replay buffer .*step10-rank0.pt is missing"):
        check_resume_replay(str(ckpt), cfg, positions)
    cfg = apply(RunConfig(), {"stream.reuse": "4", "stream.buffer": 8192, "train.max_steps": 200})
    with pytest.raises(UsageError, match="resume with --train.max_steps 100"):
        check_resume_replay(str(ckpt), cfg, positions)
    (tmp_path / "checkpoints" / "replay").mkdir(parents=True)
    (tmp_path / "checkpoints" / "replay" / "step10-rank0.pt").write_bytes(b"x")
    cfg = apply(RunConfig(), {"stream.reuse": "4", "stream.buffer": 8192, "train.max_steps": 100})
    check_resume_replay(str(ckpt), cfg, positions)


def test_a_buffer_larger_than_memory_is_refused_with_its_bytes(monkeypatch):
    from streamgen.launch import checks

    cfg = apply(RunConfig(), {"stream.reuse": "auto", "stream.buffer": 10**6})
    monkeypatch.setattr(checks, "host_memory_available", lambda: 8 * 2**30)
    with pytest.raises(UsageError, match=r"need 183\.\d\d GiB per rank .* lower --stream.buffer"):
        checks.check_replay_memory(cfg, "cpu", 0)
    monkeypatch.setattr(checks, "gpu_memory_bytes", lambda: 80 * 2**30)
    small = apply(RunConfig(), {"stream.reuse": "auto", "stream.buffer": 8192})  # 1.5 GiB
    assert checks.check_replay_memory(small, "gpu", 0) is True  # on the trainer's GPU
    middle = apply(RunConfig(), {"stream.reuse": "auto", "stream.buffer": 8192 * 16})  # 24 GiB > 20 GiB
    monkeypatch.setattr(checks, "host_memory_available", lambda: 256 * 2**30)
    assert checks.check_replay_memory(middle, "gpu", 0) is False  # in host memory


# -- the figures ---------------------------------------------------------------------------------


def test_compute_monitor_counts_unique_images_and_fresh_fraction_from_the_ranks():
    from streamgen.train.compute import ComputeMonitor

    monitor = ComputeMonitor(1, 1, log_every=1)
    monitor.stream = True
    monitor.images_seen, monitor.fresh_seen = 400, 100
    assert monitor.metrics()["data/mean_uses"] == 4.0
    assert monitor.metrics()["stream/fresh_fraction"] == 0.25
    monitor._window_start = (400, 100)
    monitor.images_seen, monitor.fresh_seen = 500, 150
    assert monitor.metrics()["stream/fresh_fraction"] == 0.5  # since the last point


# -- end to end: train.py as a user runs it ------------------------------------------------------

FAST = ("--model", "fake", "--generators", "1")


def run_folder(tmp_path: Path, name: str, version: int = 0) -> Path:
    return tmp_path / "runs" / name / f"version_{version}"


def rank_audit(folder: Path, rank: int = 0):
    return read_audit(folder / f"consumed-rank{rank}.tsv")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reuse_k_end_to_end_exact_reproducible_and_ranks_disjoint(train_run, tmp_path):
    args = (*FAST, "--trainers", "2", "--stream.reuse", "4", "--stream.buffer", "64", "--train.max_steps", "16")
    args += ("--train.log_every", "4", "--train.checkpoint_every", "100")
    first = train_run(*args, "--name", "a")
    assert first.wait(420) == 0, first.output[-3000:]
    second = train_run(*args, "--name", "b")
    assert second.wait(420) == 0, second.output[-3000:]
    ids_of_rank = []
    for rank in (0, 1):
        a, b = rank_audit(run_folder(tmp_path, "a"), rank), rank_audit(run_folder(tmp_path, "b"), rank)
        assert a == b  # the same samples at the same steps, whatever the generator's timing
        assert [row[0] for row in a] == list(range(16))
        uses = uses_per_id(a)
        assert set(uses.values()) == {4} and len(uses) == 16 * 8 // 4  # every id exactly 4 times
        assert sorted(i for row in a for i in row[2]) == sorted(uses)  # each once fresh
        ids_of_rank.append(set(uses))
    assert not ids_of_rank[0] & ids_of_rank[1]  # two DDP ranks never share an id
    scalars = read_scalars(run_folder(tmp_path, "a"))
    assert scalars["data/images_seen"][-1] == (16, 16 * 8 * 2)
    assert scalars["data/unique_images"][-1] == (16, 16 * 8 * 2 / 4)  # summed over ranks
    assert scalars["data/mean_uses"][-1] == (16, 4.0)
    assert " uses=4.00" in first.output  # the terminal shows the reuse


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reuse_auto_with_a_slow_generator_never_waits_and_keeps_fresh_exactly_once(train_run, tmp_path):
    run = train_run(
        *FAST, "--stream.reuse", "auto", "--stream.buffer", "32", "--train.max_steps", "60",
        "--train.log_every", "10", "--name", "auto",
        env={"STREAMGEN_FAKE_DELAY": "2"},  # a unit of 8 takes 4 s: many trainer steps
    )  # fmt: skip
    assert run.wait(420) == 0, run.output[-3000:]
    folder = run_folder(tmp_path, "auto")
    rows = rank_audit(folder)
    assert [row[0] for row in rows] == list(range(60))
    units = [row[1] for row in rows if row[1] is not None]
    fresh = [i for row in rows for i in row[2]]
    assert len(units) == len(set(units)) and len(fresh) == len(set(fresh)) == 8 * len(units)  # once each
    seen = set()
    for _, _, f, replayed in rows:  # a replay only of what has arrived fresh, and in the buffer (32)
        assert set(replayed) <= seen
        seen |= set(f)
    assert 1 <= len(units) < 45  # the generator was the bottleneck: replays filled the gaps
    scalars = read_scalars(folder)
    waits = [v for _, v in scalars["stream/trainer_wait_fraction"]]
    assert max(waits) < 0.05, waits  # the trainer never waited on a non-empty buffer
    assert scalars["data/unique_images"][-1][1] == len(fresh)
    assert scalars["stream/fresh_fraction"][-1][1] < 1


@pytest.mark.long  # the unit test test_a_resumed_module_continues_exactly_as_the_uninterrupted_one covers it
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reuse_k_resumed_mid_run_equals_the_uninterrupted_run(train_run, tmp_path):
    args = (*FAST, "--stream.reuse", "4", "--stream.buffer", "64", "--train.max_steps", "40")
    args += ("--train.checkpoint_every", "10", "--train.log_every", "5")
    whole = train_run(*args, "--name", "whole")
    assert whole.wait(300) == 0, whole.output[-2000:]
    expected = rank_audit(run_folder(tmp_path, "whole"))
    first = train_run(*args, "--name", "halves")
    half = run_folder(tmp_path, "halves")
    deadline = time.monotonic() + 300
    while not (half / "consumed-rank0.tsv").exists() or len(rank_audit(half)) < 25:
        assert time.monotonic() < deadline and first.proc.poll() is None, first.output[-2000:]
        time.sleep(0.2)
    first.kill_group()  # a crash after the checkpoint at step 20
    ckpt = half / "checkpoints" / "step0000020.ckpt"
    assert (half / "checkpoints" / "replay" / "step20-rank0.pt").is_file()
    assert any(row[0] >= 20 for row in rank_audit(half))  # the kill came after the checkpoint
    second = train_run(*args, "--name", "halves", "--resume", str(ckpt))
    assert second.wait(300) == 0, second.output[-2000:]
    # It continues in its own folder; its audit trail, rewound to the checkpoint (the steps since
    # were lost) and continued, is the uninterrupted run's.
    assert not (half.parent / "version_1").exists()
    assert rank_audit(half) == expected
    other = train_run(*args, "--name", "halves", "--resume", str(ckpt), "--stream.reuse", "auto")
    assert other.wait(120) == 2 and "trained with --stream.reuse 4; resume with it" in other.output


@pytest.mark.long  # reuse 1 builds the plain stream's data module (test_reuse_1_is_the_plain_stream)
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reuse_1_is_todays_stream(train_run, tmp_path):
    from conftest import read_consumed

    args = (*FAST, "--train.max_steps", "20", "--train.log_every", "5")
    plain = train_run(*args, "--name", "plain")
    assert plain.wait(300) == 0, plain.output[-2000:]
    one = train_run(*args, "--name", "one", "--stream.reuse", "1")
    assert one.wait(300) == 0, one.output[-2000:]
    assert read_consumed(run_folder(tmp_path, "plain")) == read_consumed(run_folder(tmp_path, "one"))
    a, b = read_scalars(run_folder(tmp_path, "plain")), read_scalars(run_folder(tmp_path, "one"))
    assert a["train/loss"] == b["train/loss"]


# -- the comparison along the knob ---------------------------------------------------------------


def logged_run(folder: Path, config: dict, uses: float) -> Path:
    """A run folder as train.py writes it, whose images were each used ``uses`` times."""
    import yaml
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"generators": 1, "trainers": 1, **config}))
    writer = SummaryWriter(str(folder))
    for step in (10, 20):
        writer.add_scalar("compute/total_gpu_hours", step / 20, step)
        writer.add_scalar("data/images_seen", step * 8, step)
        writer.add_scalar("data/unique_images", step * 8 / uses, step)
        writer.add_scalar("val/top1", 0.01 * step * uses, step)
    writer.close()
    return folder


def test_compare_labels_and_draws_stream_replay_and_cache_runs_against_unique_images(tmp_path):
    from streamgen.compare import TABLE, compare, compared_metrics, figure, label_runs, load_run

    folders = [
        logged_run(tmp_path / "s" / "version_0", {"source": "stream", "stream": {"reuse": "1"}}, 1),
        logged_run(tmp_path / "k" / "version_0", {"source": "stream", "stream": {"reuse": "4", "buffer": 64}}, 4),
        logged_run(tmp_path / "a" / "version_0", {"source": "stream", "stream": {"reuse": "auto"}}, 2),
        logged_run(tmp_path / "c" / "version_0", {"source": "cache", "cache": {"scale": 1.0, "images": 80}}, 2),
    ]
    runs = [load_run(f) for f in folders]
    assert [r.arm for r in runs] == ["stream", "reuse 4", "reuse auto", "cache 1x"]
    label_runs(runs)  # by what differs: the arm, and the buffer the reuse-4 run was given
    assert [r.label for r in runs] == ["stream", "reuse 4, buffer 64", "reuse auto", "cache 1x"]
    fig = figure(runs, compared_metrics(runs))
    top1 = fig.axes[:3]  # the first row: validation top-1 against GPU-hours, images seen, unique images
    assert "unique images" in top1[2].get_xlabel()
    labels = [line.get_label() for line in top1[2].get_lines()]
    assert labels == ["stream", "reuse 4, buffer 64", "reuse auto", "cache 1x"]
    assert list(top1[2].get_lines()[1].get_xdata()) == [20.0, 40.0]  # reuse 4: a quarter of the images seen
    assert list(top1[1].get_lines()[1].get_xdata()) == [80.0, 160.0]
    compare(folders, tmp_path / "cmp")
    table = (tmp_path / "cmp" / TABLE).read_text()
    assert "| stream, 1 generator(s), 1 trainer(s) |" in table
    assert "| stream, reuse 4 (buffer 64), 1 generator(s), 1 trainer(s) |" in table
    assert "| cache (80 images), 1 trainer(s) |" in table


def test_a_replay_checkpoint_is_read_as_a_stream_position_by_the_launcher():
    from streamgen.train.stream_data import stream_state

    state = {"format": "streamgen-stream/1", "cursors": []}
    assert stream_state({ReplayDataModule.__qualname__: state}) == state  # Lightning keys it by class name
    assert stream_state({StreamDataModule.__qualname__: state}) == state


@pytest.mark.parametrize("name", ["in100_reuse4_cdc_g2", "in100_reuse16_cdc_g2", "in100_reuseauto_cdc_g2"])
def test_the_reuse_family_differs_from_the_stream_arm_only_in_reuse_and_steps(name):
    import yaml

    from streamgen.config import parse_config

    root = Path(__file__).resolve().parents[2] / "configs"
    arm, stream = (yaml.safe_load((root / f"{n}.yaml").read_text()) for n in (name, "in100_stream_cdc_g2"))
    parse_config(["--config", str(root / f"{name}.yaml")])  # valid as it stands
    for key in ("seed", "classes", "prompt", "model", "source", "generator"):
        assert arm[key] == stream[key], key
    assert {k: v for k, v in arm["stream"].items() if k not in ("reuse", "buffer")} == stream["stream"]
    assert arm["train"]["budget_gpu_hours"] == stream["train"]["budget_gpu_hours"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stream.reuse", "0"], "--stream.reuse must be a whole number >= 1 or auto"),
        (["--stream.reuse", "auto", "--stream.buffer", "4"], "smaller than one batch (8 samples)"),
        (["--stream.reuse", "4", "--stream.buffer", "16"], "raise it to at least 44"),
        (["--stream.reuse", "3"], "a multiple of 3 (e.g. 48)"),
        (["--stream.reuse", "auto", "--stream.buffer", "100000000"], "lower --stream.buffer"),
        (["--stream.reuse", "4", "--source", "cache", "--cache.images", "64"], "a cache run reuses its images"),
    ],
)
def test_bad_replay_input_exits_2_with_one_line_before_anything_starts(tmp_path, capsys, args, message):
    import os

    from conftest import ROOT, descendants

    from streamgen.launch.launcher import main

    code = main(["--config", str(ROOT / "configs/smoke_tiny.yaml"), "--out", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() and not descendants(os.getpid())


def test_a_queue_can_be_polled_without_waiting():
    q = make_queue(2)
    assert q.try_get() is None
    fill(q, 5)
    fill(q, 3)
    assert q.try_get(unit=4) is None  # in-order consumption: only the unit expected next
    slot = q.try_get(unit=5)
    assert q.unit(slot) == 5 and q.try_get() is not None and q.try_get() is None
    q.close("stopping")
    with pytest.raises(Exception, match="stopping"):
        q.try_get()
