"""Compute accounting (device-seconds held), its TensorBoard figures and --train.budget_gpu_hours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamgen.config import RunConfig, parse_config
from streamgen.errors import UsageError
from streamgen.train.compute import (
    BuildCost,
    ComputeLedger,
    ComputeMonitor,
    milli_gpu_hours,
    read_build_cost,
)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeLogger:
    """Records scalars as TensorBoard's SummaryWriter.add_scalar would write them."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, float, int]] = []
        self.descriptions: dict[str, str] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.logged.append((tag, value, step))

    def series(self, tag: str) -> list[tuple[int, float]]:
        return [(step, value) for t, value, step in self.logged if t == tag]

    def at_step(self, step: int) -> dict[str, float]:
        return {t: value for t, value, s in self.logged if s == step}


class FakeStrategy:
    """Single-process stand-in; ``rank0_says`` plays rank 0's side of the broadcast on other ranks."""

    def __init__(self, rank0_says: bool | None = None) -> None:
        self.rank0_says = rank0_says
        self.broadcasts = 0

    def broadcast(self, obj, src: int = 0):
        self.broadcasts += 1
        return obj if self.rank0_says is None else self.rank0_says


class FakeTrainer:
    def __init__(self, world_size: int = 1, rank: int = 0, rank0_says: bool | None = None) -> None:
        self.global_step = 0
        self.world_size = world_size
        self.is_global_zero = rank == 0
        self.logger = FakeLogger()
        self.strategy = FakeStrategy(rank0_says)
        self.should_stop = False
        self.sanity_checking = False
        self.callback_metrics: dict = {}
        self.saved: list[Path] = []
        self.callbacks: list = []

    def save_checkpoint(self, path) -> None:
        self.saved.append(Path(path))


def batch(n: int) -> dict:
    return {"label": [0] * n}


def run_steps(monitor: ComputeMonitor, trainer: FakeTrainer, clock: FakeClock, steps: int, dt: float, n: int = 8):
    """``steps`` trainer steps of ``dt`` seconds each; stops early like Lightning when should_stop is set."""
    for _ in range(steps):
        clock.t += dt
        trainer.global_step += 1
        monitor.on_train_batch_end(trainer, None, None, batch(n), trainer.global_step - 1)
        if trainer.should_stop:
            break


# -- the arithmetic -------------------------------------------------------------------------------


def test_ledger_counts_devices_times_wall_time_per_role():
    ledger = ComputeLedger(generators=3, trainers=2, started=100.0)
    assert ledger.generator_seconds(160.0) == 3 * 60
    assert ledger.trainer_seconds(160.0) == 2 * 60
    assert ledger.total_seconds(160.0) == 5 * 60
    assert ledger.total_seconds(50.0) == 0  # a clock before the start counts nothing


def test_ledger_adds_a_cache_build_as_generator_compute_and_continues_earlier_sessions():
    ledger = ComputeLedger(generators=0, trainers=4, started=0.0, build_seconds=7200.0, earlier_trainer_seconds=360.0)
    assert ledger.generator_seconds(10.0) == 7200.0
    assert ledger.trainer_seconds(10.0) == 360.0 + 4 * 10
    # A checkpoint carries what was held, not the fixed build cost (re-read from the manifest).
    assert ledger.carried(10.0) == {"generator_device_seconds": 0.0, "trainer_device_seconds": 400.0}


def test_monitor_logs_compute_and_images_on_the_global_step_convention():
    clock = FakeClock()
    monitor = ComputeMonitor(generators=2, trainers=2, log_every=5, clock=clock)
    trainer = FakeTrainer(world_size=2)
    run_steps(monitor, trainer, clock, steps=12, dt=36.0, n=8)  # 36 s: 0.01 h of wall per step
    logged = trainer.logger.series("compute/total_gpu_hours")
    assert [step for step, _ in logged] == [5, 10]
    assert logged[0][1] == pytest.approx(4 * 5 * 0.01)  # 4 devices x 5 steps x 0.01 h
    assert trainer.logger.series("compute/generator_gpu_hours")[1][1] == pytest.approx(2 * 10 * 0.01)
    assert trainer.logger.series("compute/trainer_gpu_hours")[1][1] == pytest.approx(2 * 10 * 0.01)
    assert trainer.logger.series("data/images_seen") == [(5, 5 * 8 * 2), (10, 10 * 8 * 2)]  # all ranks
    assert trainer.logger.series("data/unique_images") == [(5, 80), (10, 160)]  # a stream: all new
    assert monitor.total_gpu_hours == pytest.approx(4 * 12 * 0.01)
    assert trainer.strategy.broadcasts == 0  # no budget: no collective at all


def test_cache_run_counts_the_manifest_build_and_no_generators_while_training(tmp_path):
    manifest = {"images": 100, "build": {"device_seconds": 1800.0, "devices": 2}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cfg = RunConfig()
    cfg.source, cfg.cache.dir, cfg.generators, cfg.trainers, cfg.train.log_every = "cache", str(tmp_path), 4, 1, 1
    clock = FakeClock()
    monitor = ComputeMonitor.from_config(cfg, tmp_path / "run")
    monitor.clock = clock
    monitor.ledger.started = clock.t
    trainer = FakeTrainer()
    run_steps(monitor, trainer, clock, steps=20, dt=36.0, n=8)
    assert monitor.generator_gpu_hours == pytest.approx(0.5)  # the build only: 1800 device-seconds
    assert monitor.trainer_gpu_hours == pytest.approx(20 * 0.01)
    assert monitor.total_gpu_hours == pytest.approx(0.5 + 0.2)
    assert trainer.logger.series("data/images_seen")[-1] == (20, 160)
    assert trainer.logger.series("data/unique_images")[-1] == (20, 100)  # a cache of 100 images
    assert trainer.logger.series("data/unique_images")[5] == (6, 48)


def test_resume_continues_the_totals_from_the_checkpoint():
    clock = FakeClock()
    first = ComputeMonitor(generators=2, trainers=1, log_every=1, clock=clock)
    trainer = FakeTrainer()
    run_steps(first, trainer, clock, steps=10, dt=36.0)
    state = first.state_dict()
    assert first.total_gpu_hours == pytest.approx(0.3)

    clock.t += 5000.0  # the run was down for a while: that time is not counted
    second = ComputeMonitor(generators=3, trainers=1, log_every=1, clock=clock)  # more generators after resume
    second.load_state_dict(state)
    resumed = FakeTrainer()
    resumed.global_step = 10
    run_steps(second, resumed, clock, steps=10, dt=36.0)
    assert second.generator_gpu_hours == pytest.approx(2 * 0.1 + 3 * 0.1)
    assert second.trainer_gpu_hours == pytest.approx(0.1 + 0.1)
    assert second.images_seen == 160
    assert resumed.logger.series("compute/total_gpu_hours")[0][0] == 11


def test_read_build_cost_is_defensive(tmp_path):
    warnings: list[str] = []
    assert read_build_cost(tmp_path, warn=warnings.append) == BuildCost()
    assert "manifest.json" in warnings[0]
    (tmp_path / "manifest.json").write_text("{not json")
    assert read_build_cost(tmp_path, warn=warnings.append).device_seconds == 0.0
    (tmp_path / "manifest.json").write_text(json.dumps({"build": {"device_seconds": 36.5, "devices": 3}}))
    assert read_build_cost(tmp_path) == BuildCost(36.5, 3, None)


# -- the budget -----------------------------------------------------------------------------------


def test_budget_stops_at_the_first_step_that_reaches_it_and_saves_last_ckpt(tmp_path):
    clock = FakeClock()
    said: list[str] = []
    monitor = ComputeMonitor(
        generators=1,
        trainers=1,
        log_every=100,
        budget_gpu_hours=0.1,
        checkpoint_dir=tmp_path / "checkpoints",
        clock=clock,
        log=said.append,
    )
    trainer = FakeTrainer()
    run_steps(monitor, trainer, clock, steps=1000, dt=36.0)  # 0.02 GPU-hours per step
    assert trainer.should_stop and monitor.stopped_by_budget
    assert trainer.global_step == 5  # 5 x 0.02 = 0.1: the first step at the budget
    assert trainer.saved == [tmp_path / "checkpoints" / "last.ckpt"]
    step, total = trainer.logger.series("compute/total_gpu_hours")[-1]
    assert step == 5 and total >= 0.1  # logged at the stop even though log_every is 100
    assert len(said) == 1 and "0.1 GPU-hours" in said[0] and "budget" in said[0]


def test_budget_decision_is_rank_zeros_on_every_rank(tmp_path):
    clock = FakeClock()
    # Rank 1's own clock says the budget is not reached; rank 0's broadcast decides.
    monitor = ComputeMonitor(1, 1, budget_gpu_hours=100.0, checkpoint_dir=tmp_path, clock=clock)
    trainer = FakeTrainer(world_size=2, rank=1, rank0_says=True)
    run_steps(monitor, trainer, clock, steps=3, dt=1.0)
    assert trainer.global_step == 1 and trainer.should_stop
    assert trainer.saved == [tmp_path / "last.ckpt"]  # every rank joins the (collective) save
    assert trainer.logger.logged == []  # only rank 0 logs

    other = ComputeMonitor(1, 1, budget_gpu_hours=1e-9, checkpoint_dir=tmp_path, clock=clock)
    trainer = FakeTrainer(world_size=2, rank=1, rank0_says=False)
    run_steps(other, trainer, clock, steps=3, dt=1.0)
    assert trainer.global_step == 3 and not trainer.should_stop and trainer.saved == []


def test_validation_is_also_logged_against_milli_gpu_hours():
    clock = FakeClock()
    monitor = ComputeMonitor(generators=1, trainers=1, log_every=1000, clock=clock)
    trainer = FakeTrainer()
    run_steps(monitor, trainer, clock, steps=3, dt=900.0)  # 3 x 2 devices x 0.25 h = 1.5 GPU-hours
    trainer.callback_metrics = {"val/top1": 0.25, "val/top5": 0.5, "val/skipped_images": 0.0, "train/loss": 2.0}
    monitor.on_validation_end(trainer, None)
    assert milli_gpu_hours(1.5 * 3600) == 1500
    assert trainer.logger.at_step(1500) == {"val_by_gpu_hours/top1": 0.25, "val_by_gpu_hours/top5": 0.5}
    assert trainer.logger.series("compute/total_gpu_hours") == [(3, pytest.approx(1.5))]  # exact, at the val step

    # A linear probe that ran after a step is logged once, at the compute of the next step.
    from streamgen.evaluate.probe_callback import LinearProbe

    probe = LinearProbe([], every=4)
    trainer.callbacks = [probe]
    probe.last = {"dino": {"top1": 75.0, "C": 1.0, "step": 4}}
    run_steps(monitor, trainer, clock, steps=2, dt=900.0)
    assert trainer.logger.at_step(2000) == {"probe_by_gpu_hours/dino/top1": 75.0}
    assert len(trainer.logger.series("probe_by_gpu_hours/dino/top1")) == 1
    assert len(trainer.logger.series("val_by_gpu_hours/top1")) == 1


def test_several_nodes_multiply_the_devices_held():
    clock = FakeClock()
    monitor = ComputeMonitor(generators=4, trainers=4, log_every=1, clock=clock)  # one node's
    trainer = FakeTrainer(world_size=8)  # 2 nodes x 4 ranks
    monitor.setup(trainer, None, "fit")
    run_steps(monitor, trainer, clock, steps=1, dt=3600.0)
    assert monitor.generator_gpu_hours == pytest.approx(8) and monitor.trainer_gpu_hours == pytest.approx(8)
    assert trainer.logger.descriptions["compute/total_gpu_hours"]  # TensorBoard tooltips


def test_devices_are_charged_from_their_spawn_by_the_launcher_not_from_the_trainers_start():
    clock = FakeClock(1000.0)
    # The launcher spawned the generators at t=900 and the trainer at t=950; the monitor is made at 1000
    # (after the trainer imported torch and built its model): the start-up is charged all the same.
    monitor = ComputeMonitor(generators=2, trainers=1, log_every=1, clock=clock, held_since=(900.0, 950.0))
    assert monitor.ledger.generator_seconds(clock()) == 2 * 100
    assert monitor.ledger.trainer_seconds(clock()) == 1 * 50
    clock.t += 10
    assert monitor.total_gpu_hours == pytest.approx((2 * 110 + 60) / 3600)


def validate(monitor: ComputeMonitor, trainer: FakeTrainer, clock: FakeClock, seconds: float, top1: float = 0.5):
    """One validation of ``seconds`` as Lightning runs it (between two steps, or after a stop)."""
    monitor.on_validation_start(trainer, None)
    clock.t += seconds
    trainer.callback_metrics = {"val/top1": top1}
    monitor.on_validation_end(trainer, None)


def test_the_budget_holds_with_the_final_validation_and_every_reader_gets_one_figure(tmp_path):
    clock = FakeClock()
    said: list[str] = []
    budget = 0.1  # 360 device-seconds; 2 devices x 9 s = 18 device-seconds a step
    monitor = ComputeMonitor(
        1, 1, log_every=1, budget_gpu_hours=budget, clock=clock, log=said.append, final_validation=True
    )
    trainer = FakeTrainer()
    step_cost = 2 * 9.0 / 3600
    while not trainer.should_stop:
        run_steps(monitor, trainer, clock, steps=1, dt=9.0)
        if trainer.global_step % 4 == 0 and not trainer.should_stop:
            validate(monitor, trainer, clock, seconds=30.0)  # a pause: not a step's time
    assert monitor.step_seconds == pytest.approx(9.0)  # blind to the validations
    validate(monitor, trainer, clock, seconds=30.0)  # Lightning validates after a stop
    monitor.on_train_end(trainer, None)
    final = monitor.total_gpu_hours
    assert budget - step_cost <= final <= budget  # the validation was reserved: within one step of the budget
    clock.t += 1000.0  # the process lingers (checkpoint, exit): the figure is frozen
    assert monitor.total_gpu_hours == final
    state = monitor.state_dict()
    assert (state["generator_device_seconds"] + state["trainer_device_seconds"]) / 3600 == pytest.approx(final)
    step, logged = trainer.logger.series("compute/total_gpu_hours")[-1]
    assert (step, logged) == (trainer.global_step, pytest.approx(final))
    assert f"{final:.4f} GPU-hours in all, final validation included" in said[-1]


def test_a_checkpoint_written_at_the_stop_holds_the_final_figure():
    clock = FakeClock()
    monitor = ComputeMonitor(1, 1, log_every=1, budget_gpu_hours=0.1, clock=clock)
    trainer = FakeTrainer()
    run_steps(monitor, trainer, clock, steps=1000, dt=9.0)
    saved = monitor.state_dict()  # last.ckpt at the stop step (no validation follows)
    clock.t += 3.0  # writing it, the end of fit
    monitor.on_train_end(trainer, None)
    held = (saved["generator_device_seconds"] + saved["trainer_device_seconds"]) / 3600
    assert monitor.total_gpu_hours == pytest.approx(held)
    assert trainer.logger.series("compute/total_gpu_hours")[-1][1] == pytest.approx(held)


def test_the_eta_goes_to_the_budget_when_it_comes_before_max_steps():
    clock = FakeClock()
    monitor = ComputeMonitor(1, 1, log_every=1, budget_gpu_hours=1.0, clock=clock)
    trainer = FakeTrainer()
    assert monitor.eta_seconds(0, 10_000) is None  # no step time yet
    run_steps(monitor, trainer, clock, steps=10, dt=18.0)  # 2 x 18 s = 0.01 GPU-hours a step
    validate(monitor, trainer, clock, seconds=600.0)
    run_steps(monitor, trainer, clock, steps=1, dt=18.0)
    assert monitor.step_seconds == pytest.approx(18.0)  # the validation does not swing it
    # 1.0 - 0.11 - (600 s x 2 devices = 0.333) left: 55 steps, sooner than max_steps
    assert monitor.eta_seconds(trainer.global_step, 10_000) == pytest.approx(55 * 18.0)
    assert monitor.eta_seconds(trainer.global_step, 20) == pytest.approx(9 * 18.0)  # max_steps first


def test_a_run_whose_budget_is_spent_before_its_first_step_is_refused_with_the_figures(tmp_path):
    from types import SimpleNamespace

    from streamgen.launch.checks import check_budget

    (tmp_path / "manifest.json").write_text(json.dumps({"build": {"device_seconds": 900.0, "devices": 2}}))
    cache = SimpleNamespace(complete=True, layout=SimpleNamespace(dir=str(tmp_path)))
    cfg = parse_config(["--source", "cache", "--train.budget_gpu_hours", "0.2"])
    with pytest.raises(UsageError, match=r"spent 0.25 GPU-hours before its first step \(the cache's build 0.25\)"):
        check_budget(cfg, cache)
    check_budget(parse_config(["--source", "cache", "--train.budget_gpu_hours", "0.3"]), cache)  # fits
    check_budget(parse_config(["--source", "cache"]), cache)  # no budget


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_budget_must_be_positive(value):
    with pytest.raises(UsageError, match="--train.budget_gpu_hours must be"):
        parse_config(["--train.budget_gpu_hours", value])


def test_budget_defaults_to_none_and_parses():
    assert parse_config([]).train.budget_gpu_hours is None
    assert parse_config(["--train.budget_gpu_hours", "12.5"]).train.budget_gpu_hours == 12.5


# -- end to end -----------------------------------------------------------------------------------


def _checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def assert_stopped_at_budget(folder: Path, budget: float, max_steps: int, build: float = 0.0) -> tuple[int, float]:
    """The run stopped within its budget (final validation included), at a checkpointed step
    below max_steps, and its checkpoint holds the dashboard's last compute figure."""
    from conftest import read_scalars

    total = read_scalars(folder)["compute/total_gpu_hours"]
    last_step, last_total = total[-1]
    assert 0.9 * budget <= last_total <= 1.01 * budget  # the next step and the validation would not fit
    assert last_step < max_steps
    checkpoint = _checkpoint(folder / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == last_step  # saved at the step the budget stopped
    state = checkpoint["callbacks"]["ComputeMonitor"]
    held = (state["generator_device_seconds"] + state["trainer_device_seconds"]) / 3600
    assert held + build == pytest.approx(last_total, rel=1e-6)  # a cache run adds its build (GPU-hours)
    return last_step, last_total


def _final_line_gpu_hours(output: str) -> float:
    import re

    return float(re.findall(r" step=\S+ .* gpu_hours=(\S+)$", output, re.M)[-1])


BUDGET_RUN = ("--model", "fake", "--train.max_steps", "100000", "--train.log_every", "10")


def budget_stopped_run(train_run, tmp_path) -> tuple[tuple[str, ...], Path, int, float]:
    """A run stopped by its budget with a validation after the stop, checked to show one figure
    everywhere; returns its arguments, folder, last step and total."""
    from conftest import read_scalars, write_image_folder

    from streamgen.compare import main as compare_main
    from streamgen.plan.classes import load_classes

    val = write_image_folder(tmp_path / "val", load_classes("imagenet100:10").keys[:3], per_class=2)
    budget, max_steps = 0.025, 100000  # 90 device-seconds: 45 s of 1 generator + 1 trainer, start-up included
    args = BUDGET_RUN
    val_args = ("--train.val_dir", str(val), "--train.val_every", "25", "--train.workers", "0")
    run = train_run(*args, *val_args, "--train.budget_gpu_hours", str(budget))
    assert run.wait(300) == 0, run.output[-3000:]
    folder = tmp_path / "runs" / "smoke" / "version_0"
    last_step, last_total = assert_stopped_at_budget(folder, budget, max_steps)
    scalars = read_scalars(folder)
    assert scalars["val/top1"][-1][0] == last_step  # the validation after the stop ...
    said = f"stopped by the compute budget of {budget:g} GPU-hours (--train.budget_gpu_hours) after step {last_step}"
    assert said in run.output
    assert f": {last_total:.4f} GPU-hours in all, final validation included" in run.output  # ... is in the figure
    assert _final_line_gpu_hours(run.output) == pytest.approx(last_total, abs=6e-5)  # the last log line
    assert f"{last_total:.4f} GPU-hours, wall" in run.output  # the summary
    assert compare_main([str(folder), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"| {last_total:.4g} | {last_step} |" in md  # compare's "GPU-hours so far" and steps
    # The start-up counts from the spawn: the first logged figure holds it (step 10 of a fast fake stream).
    first_step, first_total = scalars["compute/total_gpu_hours"][0]
    # Ten steps of a fake stream take well under a second; the spawn, imports and model build take
    # seconds (4.9 s measured on CI's 2 cores): above 2 s of wall, the start-up is in the figure.
    assert first_step == 10 and first_total * 3600 / 2 > 2
    return (*args, *val_args), folder, last_step, last_total


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_compute_figure_for_a_budget_stopped_run(train_run, tmp_path):
    """The log line, the checkpoint, compute/total_gpu_hours and compare give one figure: that of
    the end of training, a validation after the budget stop included."""
    budget_stopped_run(train_run, tmp_path)


@pytest.mark.long  # the first part is test_one_compute_figure_for_a_budget_stopped_run
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_budget_stopped_run_resumed_by_folder_continues_its_accounting(train_run, tmp_path):
    from conftest import read_scalars

    args, folder, last_step, last_total = budget_stopped_run(train_run, tmp_path)
    budget, max_steps = 0.025, 100000
    # Resumed by its folder with a larger budget: the same folder, the accounting continues.
    more = budget + 0.02  # the resumed part's start-up is charged too: room for it and some steps
    resumed = train_run(*args, "--train.budget_gpu_hours", str(more), "--resume", str(folder))
    assert resumed.wait(300) == 0, resumed.output[-3000:]
    assert f"at step {last_step} (" in resumed.output and "train.budget_gpu_hours 0.025 -> 0.045" in resumed.output
    assert not (tmp_path / "runs" / "smoke" / "version_1").exists()
    total = read_scalars(folder)["compute/total_gpu_hours"]
    after = [(s, v) for s, v in total if s > last_step]
    assert after and after[0][1] > last_total  # continues, does not restart from 0
    final_step, final_total = assert_stopped_at_budget(folder, more, max_steps)
    assert _final_line_gpu_hours(resumed.output) == pytest.approx(final_total, abs=6e-5)


@pytest.mark.long  # the cache's accounting end to end; its pieces: test_cache_run_counts_the_manifest_build...
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_cache_runs_build_counts_and_a_budget_it_used_up_is_refused(train_run, tmp_path, capsys):
    from conftest import read_scalars

    from streamgen.launch.launcher import main as train_main

    budget = 0.08
    cache_dir = tmp_path / "cache"
    cache = train_run(
        "--model", "fake", "--train.budget_gpu_hours", str(budget), "--cache.dir", str(cache_dir),
        "--cache.images", "64", "--train.epochs", "none", "--train.max_steps", "100000", "--train.val_shapes", "0",
        config="configs/smoke_cache.yaml",
    )  # fmt: skip
    assert cache.wait(400) == 0, cache.output[-3000:]
    folder = tmp_path / "runs" / "smoke_cache" / "version_0"
    build = json.loads((cache_dir / "manifest.json").read_text())["build"]["device_seconds"] / 3600
    step, total = assert_stopped_at_budget(folder, budget, max_steps=100000, build=build)
    scalars = read_scalars(folder)
    assert all(v == pytest.approx(build) for _, v in scalars["compute/generator_gpu_hours"])
    assert scalars["data/unique_images"][-1] == (
        step,
        min(
            64,
            step
            * parse_config(
                ["--config", str(Path(__file__).resolve().parents[2] / "configs/smoke_cache.yaml")]
            ).stream.batch_size,
        ),
    )
    # The built cache costs more than a smaller budget: refused before anything starts, with the figures.
    root = Path(__file__).resolve().parents[2]
    small = f"{build / 2:.6f}"
    code = train_main([
        "--config", str(root / "configs" / "smoke_cache.yaml"), "--model", "fake", "--cache.dir", str(cache_dir),
        "--cache.images", "64", "--out", str(tmp_path / "other"), "--train.budget_gpu_hours", small,
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"spent {build:.4g} GPU-hours before its first step (the cache's build" in err
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    "stream, cache", [("in100_stream_cdc_g2", "in100_cache1x_cdc_g2"), ("smoke_stream", "smoke_cache")]
)
def test_config_pairs_differ_only_in_reuse_at_the_same_budget(stream, cache):
    from streamgen.config import to_dict

    root = Path(__file__).resolve().parents[2]
    a, b = (to_dict(parse_config(["--config", str(root / "configs" / f"{name}.yaml")])) for name in (stream, cache))
    assert (a["source"], b["source"]) == ("stream", "cache")
    assert a["train"]["budget_gpu_hours"] == b["train"]["budget_gpu_hours"] is not None
    for key in ("classes", "prompt", "model", "seed", "generator", "stream"):
        assert a[key] == b[key], key
    for key in ("arch", "crop", "lr", "augment", "head", "label_smoothing"):
        assert a["train"][key] == b["train"][key], key


def test_the_smoke_reuse_arm_differs_from_the_stream_arm_only_in_reuse():
    from streamgen.config import to_dict

    root = Path(__file__).resolve().parents[2]
    stream, reuse = (
        to_dict(parse_config(["--config", str(root / "configs" / f"{name}.yaml")]))
        for name in ("smoke_stream", "smoke_reuse")
    )
    assert (reuse["stream"]["reuse"], reuse["stream"]["buffer"]) == ("auto", 320)
    for key in ("classes", "prompt", "model", "seed", "generator", "generators", "trainers", "source"):
        assert reuse[key] == stream[key], key
    assert {k: v for k, v in reuse["stream"].items() if k not in ("reuse", "buffer")} == {
        k: v for k, v in stream["stream"].items() if k not in ("reuse", "buffer")
    }
    assert {k: v for k, v in reuse["train"].items() if k != "max_steps"} == {
        k: v for k, v in stream["train"].items() if k != "max_steps"
    }
