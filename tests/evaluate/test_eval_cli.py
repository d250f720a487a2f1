"""eval.py as a user runs it: benchmarks as released, tables that match the JSON, one line for bad input."""

import csv
import json
import os
import subprocess

import pytest
import torch
from conftest import PYTHON, ROOT, write_benchmark, write_checkpoint, write_image_folder

import streamgen.evaluate.cli as eval_cli  # eval.py's body (eval.py itself only calls its main)
from streamgen.evaluate.benchmarks import synsets

KEYS = list(synsets("in-r")[:6])  # classes of ImageNet-R (and so of ImageNet-1K)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny forward passes on a busy shared CPU


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    """A checkpoint inside its run folder, whose config.yaml says train.crop 32."""
    run = tmp_path_factory.mktemp("runs") / "tiny" / "version_0"
    return write_checkpoint(run / "checkpoints" / "last.ckpt", KEYS, crop=32), run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    val = write_benchmark(base / "imagenet", "in-val")
    (good,) = (val / KEYS[0]).iterdir()
    (val / KEYS[0] / "ILSVRC2012_val_00099999.JPEG").write_bytes(good.read_bytes()[:100])  # a truncated copy
    return {
        "in-val": val,
        "in-v2": write_benchmark(base / "v2", "in-v2:matched-frequency"),
        "in-r": write_benchmark(base / "r", "in-r"),
        "in-a": write_benchmark(base / "a", "in-a"),
    }


def run_eval(*args):
    return subprocess.run(
        [PYTHON, str(ROOT / "eval.py"), *map(str, args)], capture_output=True, text=True, timeout=240, env=ENV
    )


def table_cells(stdout: str, table: int = 0) -> dict[str, str]:
    """Header -> cell of the one row of the ``table``-th Markdown table printed."""
    blocks = [[line for line in block.splitlines() if line.startswith("|")] for block in stdout.split("\n\n")]
    lines = [block for block in blocks if block][table]
    header, row = ([c.strip() for c in line.strip("|").split("|")] for line in (lines[0], lines[2]))
    return dict(zip(header, row))


@pytest.mark.timeout(300)
def test_benchmarks_as_released_table_matches_json(tmp_path, run_checkpoint, releases):
    _, checkpoint = run_checkpoint
    out = tmp_path / "results.json"
    data = [f"in-val={releases['in-val'].parent}", releases["in-v2"], releases["in-r"].parent, releases["in-a"]]
    probe = tmp_path / "shapes"  # a generic train/ + test/ transfer folder
    for split, n in (("train", 6), ("test", 3)):
        write_image_folder(probe / split, ["red", "blue"], per_class=n, seed=len(split))
    args = ["--probe", f"folder-shapes={probe}", "--seeds", 2, "--workers", 2, "--table", "--out", out]
    result = run_eval(checkpoint, "--data", *data, *args)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["crop"] == 32 and "crop 32 (from " in result.stdout  # the training crop, from config.yaml
    by_name = {r["dataset"]: r for r in report["benchmarks"]}
    assert list(by_name) == ["in-val", "in-v2", "in-r", "in-a"]
    assert (by_name["in-val"]["classes"], by_name["in-val"]["folder_classes"]) == (6, 1000)
    assert (by_name["in-val"]["images"], by_name["in-val"]["skipped"]) == (6, 1)  # the truncated JPEG
    assert "ILSVRC2012_val_00099999.JPEG" in by_name["in-val"]["skipped_examples"][0]
    assert "ILSVRC2012_val_00099999.JPEG" in result.stderr  # named in the log
    assert (by_name["in-r"]["classes"], by_name["in-r"]["predicted_among"]) == (6, 6)
    assert by_name["in-a"]["classes"] == len(set(KEYS) & set(synsets("in-a")))
    tab1, tab2 = table_cells(result.stdout, 0), table_cells(result.stdout, 1)
    assert tab1["Model"] == tab2["Model"] == "tiny/version_0 (last)"
    for title, name in (("IN-Val", "in-val"), ("IN-v2", "in-v2"), ("IN-R", "in-r")):
        assert tab1[title] == f"{by_name[name]['top1']:.2f}"
    a = by_name["in-a"]  # the model knows classes IN-A lacks: both prediction sets, labelled
    assert (a["predicted_among"], a["other_among"]) == (a["classes"], len(KEYS)) and a["classes"] < len(KEYS)
    assert tab1[f"IN-A (among {a['classes']} shared)"] == f"{a['top1']:.2f}"
    assert tab1[f"IN-A (among all {len(KEYS)})"] == f"{a['other_top1']:.2f}"
    assert by_name["in-r"]["other_among"] is None  # it shares all 6: one prediction set
    assert tab1["IN-Sketch"] == "-"
    (shapes,) = report["probes"]
    assert (shapes["dataset"], shapes["seeds"], shapes["n_test"], shapes["n_classes"]) == ("folder-shapes", 2, 6, 2)
    std = f" ± {shapes['top1_std']:.2f}" if shapes["top1_std"] else ""
    assert tab2["folder-shapes"] == f"{shapes['top1']:.2f}{std}"
    assert tab2["Avg"] == f"{shapes['top1']:.2f}"


@pytest.mark.timeout(120)
def test_csv_output_and_the_plain_report(tmp_path, run_checkpoint, releases, capsys):
    _, checkpoint = run_checkpoint
    out = tmp_path / "results.csv"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forward passes on a busy shared CPU
    try:
        code = eval_cli.main([str(checkpoint), "--data", str(releases["in-r"]), "--workers", "0", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert code == 0
    (row,) = list(csv.DictReader(out.open()))
    assert row["kind"] == "benchmark" and row["dataset"] == "in-r" and row["images"] == "6"
    assert "IN-R: scored 6 of its 200 classes (those the model knows); predictions among 6 classes" in stdout
    assert f"{float(row['top1']):.2f}" in stdout
    assert not list(tmp_path.glob(".results.csv.*"))  # no temporary file left


# -- bad input: one line, exit status 2, before the model is loaded or anything evaluated ----------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model is an error: every check must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("streamgen.evaluate.benchmark_eval.load_classifier", boom)


def bad_input(capsys, *args) -> str:
    code = eval_cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval.py: error: "), captured.err
    assert captured.out == ""
    return lines[0]


BAD = [
    (["--batch_size", 0], "--batch_size 0: must be at least 1"),
    (["--crop", 0], "--crop 0: must be at least 1"),
    (["--workers", -1], "--workers -1: must be at least 0"),
    (["--seeds", 0], "--seeds 0: must be at least 1"),
    (["--device", "tpu9"], "--device tpu9: not a device; use cpu, cuda or cuda:N"),
    (["--out", "/proc/results.json"], "--out /proc/results.json: cannot write in /proc"),
    (["--out", "/nonexistent/results.json"], "folder /nonexistent does not exist"),
    (["--out", "results.txt"], "name a .json or .csv file"),
    (["--batch-size", "many"], "argument --batch_size/--batch-size: invalid int value: 'many'"),  # old spelling too
    (["--batchsize", 8], "unknown flag --batchsize (did you mean --batch_size?)"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[str(a[0]) + "=" + str(a[1]) for a, _ in BAD])
def test_bad_values_are_one_line(capsys, no_model_load, run_checkpoint, releases, args, message):
    _, checkpoint = run_checkpoint
    assert message in bad_input(capsys, checkpoint, "--data", releases["in-r"], *args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_says_so(capsys, no_model_load, run_checkpoint, releases):
    _, checkpoint = run_checkpoint
    line = bad_input(capsys, checkpoint, "--data", releases["in-r"], "--device", "cuda")
    assert "--device cuda: this machine has no usable CUDA GPU; use --device cpu" in line
    assert "checkpoint" not in line


def test_a_typo_in_the_second_folder_is_found_before_the_first_is_evaluated(
    capsys, no_model_load, run_checkpoint, releases
):
    _, checkpoint = run_checkpoint
    typo = str(releases["in-a"]) + "x"
    assert f"--data {typo}: does not exist" in bad_input(capsys, checkpoint, "--data", releases["in-r"], typo)


def test_an_unknown_dataset_name(capsys, no_model_load, run_checkpoint, releases):
    _, checkpoint = run_checkpoint
    line = bad_input(capsys, checkpoint, "--data", f"imagenet-z={releases['in-r']}")
    assert "unknown dataset name 'imagenet-z'" in line


def test_a_benchmark_named_wrongly(capsys, no_model_load, run_checkpoint, releases):
    _, checkpoint = run_checkpoint
    line = bad_input(capsys, checkpoint, "--data", f"in-v2={releases['in-r']}")
    assert "expected class-index folders 0..999" in line


def test_a_probe_that_cannot_be_found(capsys, no_model_load, run_checkpoint, tmp_path):
    _, checkpoint = run_checkpoint
    bad_input(capsys, checkpoint, "--probe", f"pets={tmp_path / 'nope'}")
    bad_input(capsys, checkpoint, "--probe", "pets")


def test_nothing_to_evaluate(capsys, no_model_load, run_checkpoint):
    _, checkpoint = run_checkpoint
    assert "nothing to evaluate" in bad_input(capsys, checkpoint)


def test_folders_without_the_models_classes_are_refused_before_evaluation(capsys, run_checkpoint, tmp_path):
    _, checkpoint = run_checkpoint
    folder = write_image_folder(tmp_path / "other", ["n09999999"], per_class=1)
    assert "none of its 1 classes" in bad_input(capsys, checkpoint, "--data", folder)


def test_not_a_checkpoint(capsys, tmp_path, releases):
    bad = tmp_path / "x.ckpt"
    bad.write_text("hello")
    assert "not a streamgen classifier checkpoint" in bad_input(capsys, bad, "--data", releases["in-r"])


def test_workers_never_exceed_the_cores():
    assert eval_cli.usable_workers(10_000) == len(os.sched_getaffinity(0))
    assert eval_cli.usable_workers(0) == 0
