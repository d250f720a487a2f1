"""Linear probes while training: probe/* logged at the global step, one rank or two, no stream sample lost."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from conftest import ROOT, descendants, read_consumed, read_scalars
from test_probe import draw_shapes

from streamgen.evaluate.probe_callback import LinearProbe, interleave
from streamgen.launch.launcher import main

FAST = ("--model", "fake", "--generators", "1", "--train.workers", "0")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    draw_shapes(root / "train", 6, seed=0)
    draw_shapes(root / "test", 4, seed=1)
    return root


def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "smoke" / "version_0"


def test_interleave_puts_each_ranks_share_back_in_dataset_order():
    n, world = 7, 3
    rows = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)
    shares = []
    for r in range(world):  # rank r extracted images r, r+3, ...; padded to the largest share
        mine = rows[r::world]
        shares.append(torch.cat([mine, torch.full((3 - len(mine), 2), -1.0)]))
    assert torch.equal(interleave(shares, n), rows)


class FakeLogger:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((step, metrics))


def fake_trainer(step: int) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, global_rank=0, world_size=1, is_global_zero=True, loggers=[FakeLogger()])


@pytest.mark.timeout(120)
def test_the_callback_probes_every_n_steps_beats_and_logs(shapes):
    torch.manual_seed(0)
    net = torch.nn.Module()  # a LightningModule's shape: the network is .net
    net.net = torchvision.models.resnet18(num_classes=3)
    beats = []
    callback = LinearProbe(
        [("folder", str(shapes))], every=4, crop=32, subset=3, workers=0, beat=lambda: beats.append(1)
    )
    callback.setup(None, net, "fit")
    for step in (1, 2, 3, 5):
        callback.on_train_batch_end(trainer := fake_trainer(step), net, None, None, step - 1)
        assert not trainer.loggers[0].logged and not beats  # not a probe step
    callback.on_train_batch_end(trainer := fake_trainer(8), net, None, None, 7)
    ((step, metrics),) = trainer.loggers[0].logged
    assert step == 8 and set(metrics) == {"probe/folder/top1", "probe/folder/C", "probe/seconds"}
    assert callback.last["folder"] == {"top1": metrics["probe/folder/top1"], "C": metrics["probe/folder/C"], "step": 8}
    assert len(beats) > 10  # while extracting and at every loss evaluation of the fits
    assert net.net.training  # back in training mode


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.probes", "imagenet=/tmp"], "unknown transfer dataset 'imagenet'"),
        (["--train.probes", "dtd"], "must be NAME=ROOT"),
        (["--train.probes", "dtd=/nonexistent/dtd"], "no such folder"),
        (["--train.probes", "folder=SHAPES", "--train.arch", "vit_b_16"], "avgpool"),
        (["--train.probes", "food=SHAPES"], "food-101/ with images/"),
        (["--train.probes", "folder=SHAPES", "--train.probe_every", "0"], "--train.probe_every must be at least 1"),
        (["--train.probes", "folder=SHAPES", "--train.probe_subset", "1"], "--train.probe_subset must be at least 2"),
    ],
)
def test_bad_probes_are_one_line_and_exit_2_before_anything_starts(tmp_path, capsys, shapes, args, message):
    args = [a.replace("SHAPES", str(shapes)) for a in args]
    code = main(["--config", str(ROOT / "configs/smoke_tiny.yaml"), "--out", str(tmp_path / "runs"), *FAST, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() and not descendants(os.getpid())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_logs_probes_at_their_steps(train_run, tmp_path, shapes):
    probes = f"folder-shapes={shapes},folder-few={shapes}"
    run = train_run(*FAST, "--train.max_steps", "10", "--train.probes", probes, "--train.probe_every", "5",
                    "--train.probe_subset", "3")  # fmt: skip
    assert run.wait(240) == 0, run.output[-3000:]
    scalars = read_scalars(run_dir(tmp_path))
    for tag in ("probe/folder-shapes/top1", "probe/folder-few/top1", "probe/folder-shapes/C", "probe/seconds"):
        assert [step for step, _ in scalars[tag]] == [5, 10], tag
    assert all(0 <= v <= 100 for _, v in scalars["probe/folder-shapes/top1"])
    assert all(v > 0 for _, v in scalars["probe/seconds"])
    units = [u for _, u in read_consumed(run_dir(tmp_path))]
    assert units == list(range(10))  # the stream waited: every unit once, in order


@pytest.mark.long  # probes in a run: test_a_run_logs_probes_at_their_steps; two ranks: the launcher and replay DDP tests
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_ranks_share_the_extraction_and_lose_no_stream_sample(train_run, tmp_path, shapes):
    run = train_run(*FAST, "--trainers", "2", "--train.max_steps", "10", "--train.probes", f"folder={shapes}",
                    "--train.probe_every", "5")  # fmt: skip
    assert run.wait(360) == 0, run.output[-3000:]
    folder = run_dir(tmp_path)
    scalars = read_scalars(folder)
    assert [step for step, _ in scalars["probe/folder/top1"]] == [5, 10]  # logged once, by rank 0
    rank0, rank1 = ([u for _, u in read_consumed(folder, r)] for r in (0, 1))
    assert rank0 == list(range(0, 20, 2)) and rank1 == list(range(1, 20, 2))  # none lost, none repeated
    # The step-10 probe ran on the weights saved in last.ckpt: one process, all images, must agree.
    from streamgen.evaluate.benchmark_eval import load_classifier
    from streamgen.evaluate.probe import evaluate_probe

    model = load_classifier(folder / "checkpoints" / "last.ckpt", torch.device("cpu"))
    alone = evaluate_probe(model, "folder", str(shapes), crop=32, workers=0)
    assert abs(alone["top1"] - scalars["probe/folder/top1"][-1][1]) <= 100 / alone["n_test"] + 1e-6
