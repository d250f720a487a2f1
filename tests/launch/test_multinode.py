"""Several nodes on one machine: launchers on localhost joined over gloo, as on a cluster."""

import signal
import time

import pytest
import torch
from conftest import NODE_FLAGS, read_consumed, read_scalars, start_nodes


def run_folder(tmp_path, name: str):
    return tmp_path / "runs" / name / "version_0"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_nodes_consume_exactly_the_units_one_node_would(train_run, tmp_path):
    # The fake generator: which units each rank consumes does not depend on what makes the pixels.
    args = ("--model", "fake", "--generators", "2", "--trainers", "1", "--train.max_steps", "6")
    args += ("--train.checkpoint_every", "3")
    nodes = start_nodes(train_run, 2, *args, "--name", "two")
    for node in nodes:
        assert node.wait(300) == 0, node.output[-3000:]
    folder = run_folder(tmp_path, "two")
    per_rank = {r: [u for _, u in read_consumed(folder, r)] for r in (0, 1)}
    assert per_rank[0] == [0, 2, 4, 6, 8, 10] and per_rank[1] == [1, 3, 5, 7, 9, 11]  # in order, no overlap
    scalars = read_scalars(folder)  # rank 0 logs the throughput of every node
    for node in (0, 1):
        assert f"stream/node{node}_generator_images_per_s" in scalars and f"stream/node{node}_queue_fill" in scalars
    assert all(v > 0 for _, v in scalars["stream/generator_images_per_s"])
    state = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["StreamDataModule"]
    assert sorted(c["rank"] for c in state["cursors"]) == [0, 1] and state["world"] == 2

    one = train_run(
        *NODE_FLAGS,
        "--model",
        "fake",
        "--generators",
        "2",
        "--trainers",
        "2",
        "--train.max_steps",
        "6",
        "--name",
        "one",
    )
    assert one.wait(300) == 0, one.output[-3000:]
    single = run_folder(tmp_path, "one")
    assert {r: [u for _, u in read_consumed(single, r)] for r in (0, 1)} == per_rank

    # resume the 2-node run from its step-3 checkpoint: it continues exactly
    ckpt = folder / "checkpoints" / "step0000003.ckpt"
    resumed = start_nodes(train_run, 2, *args, "--name", "two", "--resume", str(ckpt))
    for node in resumed:
        assert node.wait(300) == 0, node.output[-3000:]
    again = run_folder(tmp_path, "two")  # it continues in its own folder: steps 3.. redone exactly
    assert again == folder and not (again.parent / "version_1").exists()
    for r in (0, 1):
        assert [u for _, u in read_consumed(again, r)] == per_rank[r]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_node_stops_the_other_within_the_timeout(train_run):
    nodes = start_nodes(
        train_run, 2, "--generators", "1", "--trainers", "1", "--train.max_steps", "100000", "--dist.timeout", "15"
    )
    nodes[0].wait_for(" step=", 200)  # global rank 0 prints the run's progress lines
    time.sleep(2)
    nodes[1].kill_group()  # node 1's launcher and everything it started, at once
    started = time.monotonic()
    code = nodes[0].wait(60)
    assert code not in (0, None) and time.monotonic() - started < 45, nodes[0].output[-3000:]
    assert "node 1" in nodes[0].output
    deadline = time.monotonic() + 10
    while nodes[0].processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not nodes[0].processes(), "a process of the surviving node outlived it"


@pytest.mark.timeout(180)
def test_nodes_with_different_configs_are_refused_before_training(train_run, tmp_path):
    nodes = start_nodes(train_run, 2, "--train.max_steps", "5", extra={1: ("--train.lr", "0.2")})
    for node in nodes:
        assert node.wait(120) == 2, node.output[-2000:]
    assert "train.lr is 0.2 there and 0.1 here" in nodes[0].output
    assert "train.lr is 0.1 there and 0.2 here" in nodes[1].output  # node 1 says the true reason ...
    assert "did not join" not in nodes[1].output and "c10d" not in nodes[1].output  # ... in one line
    assert len(nodes[1].output.strip().splitlines()) <= 2, nodes[1].output  # "joining node 0", the reason
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_on_one_node_stops_every_rank_at_one_step_after_the_checkpoint(train_run, tmp_path):
    nodes = start_nodes(
        train_run, 2, "--generators", "1", "--trainers", "1", "--train.max_steps", "100000", "--name", "term"
    )
    nodes[0].wait_for(" step=", 200)
    time.sleep(2)
    nodes[1].proc.send_signal(signal.SIGTERM)  # SLURM's notice reaches one node first
    codes = [node.wait(150) for node in nodes]
    assert codes[1] == 130 and codes[0] in (0, 130), [n.output[-1500:] for n in nodes]
    folder = run_folder(tmp_path, "term")
    step = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert step > 0
    for rank in (0, 1):  # every rank stopped after the same step, all of it in the checkpoint
        assert [s for s, _ in read_consumed(folder, rank)] == list(range(step))
