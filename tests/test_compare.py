"""python -m streamgen.compare: runs' event files -> one figure and a table at matched budgets."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import read_scalars, write_image_folder
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from streamgen.compare import FIGURE, TABLE, main


def fake_run(folder: Path, compute: dict[int, float], top1: dict[int, float], **config) -> Path:
    """A run folder as train.py writes it: config.yaml and TensorBoard scalars."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"source": "stream", "generators": 1, "trainers": 1, **config}))
    writer = SummaryWriter(str(folder))
    for step, hours in compute.items():
        writer.add_scalar("compute/total_gpu_hours", hours, step)
        writer.add_scalar("data/images_seen", step * 8, step)
    for step, value in top1.items():
        writer.add_scalar("val/top1", value, step)
    writer.close()
    return folder


def read_table(text: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the 'At matched budgets' table, as cells."""
    section = text.split("## At matched budgets", 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return header, rows[1:]  # rows[0] is the alignment line


def table_rows(text: str) -> list[list[str]]:
    return read_table(text)[1]


def test_table_takes_each_runs_last_value_at_or_before_each_budget(tmp_path, capsys):
    # Run a reaches 1.0 GPU-hours, run b 2.0: the budgets are fractions of 1.0 (what both reached).
    a = fake_run(tmp_path / "a" / "version_0", {10: 0.2, 20: 0.5, 30: 0.8, 40: 1.0}, {20: 0.1, 40: 0.3})
    b = fake_run(tmp_path / "b" / "version_0", {10: 0.1, 20: 0.4, 30: 0.75, 40: 2.0}, {10: 0.05, 30: 0.2, 40: 0.9})
    assert main([str(a), str(b), "--out", str(tmp_path / "cmp"), "--fractions", "0.5,1"]) == 0
    rows = table_rows((tmp_path / "cmp" / TABLE).read_text())
    got = {(r[0], r[1]): (r[2], r[3], r[5]) for r in rows}  # r[4]: unique images
    assert got == {
        ("0.5", "a/version_0"): ("20", "160", "10.00"),  # compute 0.5 at step 20 <= 0.5
        ("0.5", "b/version_0"): ("20", "160", "5.00"),  # its top-1 of step 10 (0.4 at step 20: none logged)
        ("1", "a/version_0"): ("40", "320", "30.00"),
        ("1", "b/version_0"): ("30", "240", "20.00"),  # step 40 cost 2.0: beyond the budget
    }
    assert Image.open(tmp_path / "cmp" / FIGURE).format == "PNG"
    assert "wrote" in capsys.readouterr().out


def test_linear_probes_get_a_column_and_a_panel_where_logged(tmp_path):
    a = fake_run(tmp_path / "a" / "version_0", {10: 0.5, 20: 1.0}, {20: 0.25})
    b = fake_run(tmp_path / "b" / "version_0", {10: 0.5, 20: 1.0}, {20: 0.5})
    writer = SummaryWriter(str(a))
    writer.add_scalar("probe/dtd/top1", 42.5, 10)  # streamgen.evaluate.probe_callback logs percent
    writer.close()
    assert main([str(a), str(b), "--out", str(tmp_path / "cmp"), "--fractions", "0.5,1"]) == 0
    header, rows = read_table((tmp_path / "cmp" / TABLE).read_text())
    column = header.index("linear probe dtd top-1 (%)")
    assert [(r[1], r[column]) for r in rows] == [
        ("a/version_0", "42.50"),
        ("b/version_0", "—"),
        ("a/version_0", "42.50"),
        ("b/version_0", "—"),
    ]
    assert [r[header.index("validation top-1 (%)")] for r in rows] == ["—", "—", "25.00", "50.00"]


def test_a_run_still_going_is_read_as_far_as_it_got(tmp_path):
    a = fake_run(tmp_path / "a" / "version_0", {10: 0.2, 20: 0.5}, {20: 0.1})
    b = fake_run(tmp_path / "b" / "version_0", {10: 0.3, 20: 0.6}, {20: 0.2})
    events = next(b.glob("events.out.tfevents.*"))
    events.write_bytes(events.read_bytes()[:-5])  # its last record (top-1 at step 20) is being written
    assert main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    rows = table_rows((tmp_path / "cmp" / TABLE).read_text())
    assert [r[5] for r in rows if r[0] == "0.5"] == ["10.00", "—"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such run folder"),
        ("parent", "is not a run folder (no config.yaml): give runs/NAME/version_K; its runs are"),
        ("no_events", "holds no TensorBoard event file yet"),
        ("no_compute", "has no compute/total_gpu_hours yet"),
        ("twice", "is given twice"),
        ("out_file", "is a file: give a folder"),
        ("out_exists", "compare.png exists: pass --overwrite"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case, message):
    good = fake_run(tmp_path / "good" / "version_0", {10: 0.5}, {10: 0.1})
    out = tmp_path / "cmp"
    runs = [good]
    if case == "missing":
        runs = [tmp_path / "nope"]
    elif case == "parent":
        runs = [tmp_path / "good"]
    elif case == "no_events":
        (tmp_path / "started").mkdir()
        (tmp_path / "started" / "config.yaml").write_text("source: stream\n")
        runs = [tmp_path / "started"]
    elif case == "no_compute":
        writer = SummaryWriter(str(tmp_path / "old"))
        writer.add_scalar("train/loss", 1.0, 1)
        writer.close()
        (tmp_path / "old" / "config.yaml").write_text("source: stream\n")
        runs = [tmp_path / "old"]
    elif case == "twice":
        runs = [good, good]
    elif case == "out_file":
        out.write_text("")
    elif case == "out_exists":
        out.mkdir()
        (out / FIGURE).write_bytes(b"mine")
    before = set(tmp_path.rglob("*"))
    assert main([*map(str, runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert set(tmp_path.rglob("*")) == before  # nothing written, no folder made
    if case == "out_exists":
        assert main([*map(str, runs), "--out", str(out), "--overwrite"]) == 0


# -- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_compare_a_finished_stream_and_cache_run_matches_their_event_files(train_run, tmp_path, capsys):
    from streamgen.plan.classes import load_classes

    val = write_image_folder(tmp_path / "val", load_classes("imagenet100:10").keys, per_class=2, size=(36, 36))
    common = ("--model", "fake", "--train.max_steps", "30", "--train.val_dir", str(val), "--train.val_every", "6")
    common += ("--train.workers", "0", "--train.val_batch_size", "10")
    cache = ("--source", "cache", "--cache.images", "64", "--cache.dir", str(tmp_path / "cache"))
    for args in (("--name", "stream"), ("--name", "cache", "--generators", "2", *cache)):
        run = train_run(*common, *args)  # one after the other: 2 cores
        assert run.wait(300) == 0, run.output[-3000:]
    folders = [tmp_path / "runs" / name / "version_0" for name in ("stream", "cache")]
    out = tmp_path / "cmp"
    assert main([*map(str, folders), "--out", str(out)]) == 0
    assert Image.open(out / FIGURE).size[0] > 500

    # The oracle: the event files read directly, each evaluation placed at the compute logged at its step.
    scalars = [read_scalars(f) for f in folders]
    budgets = [min(s["compute/total_gpu_hours"][-1][1] for s in scalars) * f for f in (0.25, 0.5, 0.75, 1.0)]
    text = (out / TABLE).read_text()
    assert f"| cache 64 images | {folders[1]} |" in text and "cache (64 images), 1 trainer(s)" in text
    header, rows = read_table(text)
    assert len(rows) == len(budgets) * 2
    top1, top5 = header.index("validation top-1 (%)"), header.index("validation top-5 (%)")
    for i, budget in enumerate(budgets):
        for j, s in enumerate(scalars):
            row = rows[2 * i + j]
            assert row[1] == ("stream", "cache 64 images")[j] and math.isclose(float(row[0]), budget, rel_tol=1e-3)
            compute = dict(s["compute/total_gpu_hours"])
            for column, tag in ((top1, "val/top1"), (top5, "val/top5")):
                assert all(step in compute for step, _ in s[tag])  # logged at every evaluation
                within = [v for step, v in s[tag] if compute[step] <= budget * (1 + 1e-9)]
                expected = f"{100 * within[-1]:.2f}" if within else "—"
                assert row[column] == expected, (budget, folders[j], tag)
    # Start-up is charged: a run whose first point costs more than the other's whole run is warned
    # about (and has no value at the matched budget); the run that sets the budget has its values.
    err = capsys.readouterr().err
    for j, s in enumerate(scalars):
        late = s["compute/total_gpu_hours"][0][1] > budgets[-1] * (1 + 1e-9)
        assert late == (f"({folders[j]}) has no point within the matched budget" in err)
        if s["compute/total_gpu_hours"][-1][1] == pytest.approx(budgets[-1]):
            assert rows[-2 + j][top1] != "—" and rows[-2 + j][top5] != "—"


def test_a_run_with_no_point_within_the_matched_budget_is_warned_about(tmp_path, capsys):
    stream = fake_run(tmp_path / "runs" / "s" / "version_0", {10: 0.05, 20: 0.1}, {20: 0.2})
    # A cache whose build alone (0.3) costs more than the stream run's whole compute.
    cache = fake_run(tmp_path / "runs" / "c" / "version_0", {10: 0.31, 20: 0.32}, {20: 0.3}, source="cache")
    assert main([str(stream), str(cache), "--out", str(tmp_path / "cmp")]) == 0
    err = capsys.readouterr().err
    said = f"warning: cache ({cache}) has no point within the matched budget of 0.1 GPU-hours: its first is at 0.31"
    assert said in err and "its cache's build alone costs more" in err
    assert "stream (" not in err
    assert f"**Warning**: cache ({cache}) has no point" in (tmp_path / "cmp" / TABLE).read_text()


def _scalars(folder: Path, **series: dict[int, float]) -> None:
    writer = SummaryWriter(str(folder))
    for tag, points in series.items():
        for step, value in points.items():
            writer.add_scalar(tag.replace("__", "/"), value, step)
    writer.close()


def test_the_figure_labels_runs_by_their_settings_and_marks_budget_build_and_seeds(tmp_path, capsys):
    from streamgen.compare import VECTOR, compared_metrics, figure, label_runs, load_run

    loss = {s: 2.0 + (s % 2) for s in range(1, 21)}  # zig-zags
    folders = []
    for name, top1, config in (
        ("s0", {10: 0.1, 20: 0.2}, {"seed": 0, "prompt": "c"}),
        ("s1", {10: 0.3, 20: 0.4}, {"seed": 1, "prompt": "c"}),  # the same setting, another seed
        ("dc", {20: 0.3}, {"seed": 0, "prompt": "c_dc"}),
    ):
        folders.append(fake_run(tmp_path / name / "version_0", {10: 0.5, 20: 1.0}, top1, **config))
        _scalars(folders[-1], train__loss=loss)
    cache = fake_run(
        tmp_path / "cache" / "version_0",
        {10: 0.6, 20: 0.9},
        {20: 0.5},
        source="cache",
        cache={"images": 64},
        seed=0,
        prompt="c",
    )
    _scalars(cache, compute__generator_gpu_hours={10: 0.4, 20: 0.4}, train__loss=loss)
    folders.append(cache)
    out = tmp_path / "cmp"
    old_mask = os.umask(0o022)
    try:
        assert main([*map(str, folders), "--out", str(out)]) == 0
    finally:
        os.umask(old_mask)
    for name in (FIGURE, TABLE, *VECTOR):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name  # readable by others
    assert (out / "compare.pdf").read_bytes().startswith(b"%PDF") and b"<svg" in (out / "compare.svg").read_bytes()
    assert Image.open(out / FIGURE).info["dpi"] == pytest.approx((200, 200), abs=0.1)

    runs = [load_run(f) for f in folders]
    label_runs(runs)
    assert [r.label for r in runs] == [
        "stream, prompt c, seed 0",
        "stream, prompt c, seed 1",
        "stream, prompt c_dc",
        "cache 64 images, prompt c",
    ]
    fig = figure(runs, compared_metrics(runs))
    titles = [ax.get_title() for ax in fig.axes]
    assert "validation top-5 (%)" not in titles  # no run logged it: no empty panel
    assert titles[::3] == ["validation top-1 (%)", "training loss (on the run's own images)"]
    val_cost, loss_cost = fig.axes[0], fig.axes[3]  # three x-axes per metric
    lines = {line.get_label(): line for line in val_cost.get_lines()}
    assert set(lines) == {"stream, prompt c (mean of 2 seeds)", "stream, prompt c_dc", "cache 64 images, prompt c",
                          "matched budget", "cache build"}  # fmt: skip
    assert list(lines["stream, prompt c (mean of 2 seeds)"].get_ydata()) == pytest.approx(
        [20.0, 30.0]
    )  # (10 + 30) / 2, (20 + 40) / 2
    (band,) = val_cost.collections  # the seeds' +- std
    assert band.get_paths()[0].vertices[:, 1].max() == pytest.approx(30 + 100 * np.std([0.2, 0.4], ddof=1))
    assert list(lines["matched budget"].get_xdata()) == pytest.approx([0.9, 0.9])  # the least compute any run reached
    assert list(lines["cache build"].get_xdata()) == pytest.approx([0.4, 0.4])
    raw, smooth = [
        line for line in loss_cost.get_lines() if line.get_color() == lines["stream, prompt c_dc"].get_color()
    ][:2]
    assert raw.get_alpha() == 0.25 and np.ptp(smooth.get_ydata()[5:]) < np.ptp(raw.get_ydata()[5:])
    # The table: the run column left-aligned, a mean +- std row for the seeds of one setting.
    text = (out / TABLE).read_text()
    section = text.split("## At matched budgets", 1)[1]
    assert "|---:|:---|---:|" in section
    (row,) = [r for r in table_rows(text) if r[0] == "0.9" and "mean ± std" in r[1]]
    assert (
        row[1] == "**stream, prompt c** (mean ± std, 2 seeds)"
        and row[5] == f"20.00 ± {100 * np.std([0.1, 0.3], ddof=1):.2f}"
    )
