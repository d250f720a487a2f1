"""A run that learns, end to end, on ``--model shapes`` (configs/smoke.yaml): the label of each
sample reaches the loss with the pixels of that sample, on every path (stream on one rank or two,
cache, SIGTERM and resume, multi-crop with the t-ReX head over a longer schedule).

Two oracles, independent of the trainer:
- alignment, exactly: the testing hook ``STREAMGEN_AUDIT_PIXELS=1`` records for every image a
  rank trains on (step, id, label, pixel digest); each label must be the plan's class of the id,
  and the class decoded from the pixels (the one class whose render for the id's seed gives
  exactly those pixels, redraws included) must be that label;
- learning: validation top-1 on held-out renders (seeds no training sample has) far above chance
  (10 classes: 0.10), and the same checkpoint on the validation folders with their labels
  permuted near chance (eval.py, as a user runs it).

Measured on the 2-core CPU, loaded (see README, smoke): val top-1 0.59-0.67 (stream, 1 rank), 0.55
(2 ranks), 0.48 (cache), 0.62 (resumed) after the smoke's 200 steps, 0.37 (multi-crop + t-ReX)
after 600; the permuted controls
0.01-0.03 (a cyclic permutation: a model that learned scores below chance). The thresholds keep a
wide margin: LEARNED 0.3 = 3x chance; permuted below 0.2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, ROOT, descendants, read_scalars

from streamgen.config import GeneratorConfig, parse_config
from streamgen.generate.shapes import BAD_ENV, ShapesGenerator, render_val_set
from streamgen.launch.launcher import main
from streamgen.plan.classes import load_classes
from streamgen.plan.prompts import PromptTemplate
from streamgen.plan.samples import SamplePlan
from streamgen.train.source import AUDIT_PIXELS_ENV, pixel_digest

SMOKE = "configs/smoke.yaml"
LEARNED = 0.3  # val top-1 (chance 0.10); measured 0.48-0.67
CHANCE_MAX = 0.2  # the permuted control (measured 0.01-0.03)
BAD = "0.05"  # a twentieth of the first draws come out black: redrawn
AUDIT = {AUDIT_PIXELS_ENV: "1", BAD_ENV: BAD}


def run_folder(tmp_path: Path, name: str = "smoke", version: int = 0) -> Path:
    return tmp_path / "runs" / name / f"version_{version}"


def read_audit(folder: Path) -> dict[int, list[tuple[int, int, int, int]]]:
    """rank -> [(step, id, label, digest)] of every image the rank trained on."""
    out = {}
    for path in sorted(folder.glob("pixels-rank*.tsv")):
        rank = int(path.stem.removeprefix("pixels-rank"))
        out[rank] = [tuple(map(int, line.split("\t"))) for line in path.read_text().splitlines()]
    return out


def assert_aligned(folder: Path, batch_size: int, decode_every: int = 10) -> int:
    """Every image a rank trained on: the plan's label, and the pixels of that label's render for
    the id (redraws included); every ``decode_every``-th step the class is decoded from the pixels
    among all classes. Returns the images checked."""
    cfg = parse_config(["--config", str(folder / "config.yaml")])
    plan = SamplePlan(load_classes(cfg.classes), PromptTemplate.parse(cfg.prompt), cfg.seed)
    os.environ[BAD_ENV] = BAD
    try:
        gen = ShapesGenerator(GeneratorConfig(max_redraws=cfg.generator.max_redraws), cfg.stream.resolution, "cpu")
    finally:
        del os.environ[BAD_ENV]
    audit = read_audit(folder)
    assert audit, "no pixels-rank*.tsv: the audit hook did not run"
    checked = 0
    for rank, rows in audit.items():
        by_step = defaultdict(list)
        for step, i, label, digest in rows:
            by_step[step].append((i, label, digest))
        for step, batch in by_step.items():
            assert len(batch) % batch_size == 0, (rank, step)
            ids = np.array([b[0] for b in batch])
            labels = np.array([b[1] for b in batch])
            digests = torch.tensor([b[2] for b in batch])
            assert np.array_equal(labels, plan.labels(ids)), f"rank {rank} step {step}: labels are not the plan's"
            seeds = plan.noise_seeds(ids).tolist()
            rendered = pixel_digest(gen.generate([""] * len(ids), seeds, labels))
            assert torch.equal(rendered, digests), f"rank {rank} step {step}: pixels are not their id's render"
            if step % decode_every == 0:  # the class from the pixels: the one family that reproduces them
                by_class = torch.stack(
                    [pixel_digest(gen.generate([""] * len(ids), seeds, np.full(len(ids), c))) for c in range(10)]
                )
                decoded = (by_class == digests).int().argmax(0).numpy()
                assert (by_class == digests).sum(0).eq(1).all() and np.array_equal(decoded, labels)
            checked += len(ids)
    return checked


def last_val_top1(folder: Path) -> float:
    return read_scalars(folder)["val/top1"][-1][1]


def permuted_copy(val: Path, dest: Path) -> Path:
    """The validation folders with their labels permuted (a cycle: no class keeps its own)."""
    keys = sorted(p.name for p in val.iterdir() if p.is_dir())
    dest.mkdir()
    for key, other in zip(keys, keys[1:] + keys[:1]):
        shutil.copytree(val / key, dest / other)
    return dest


def eval_top1(checkpoint: Path, data: Path, out: Path) -> float:
    done = subprocess.run(
        [PYTHON, str(ROOT / "eval.py"), str(checkpoint), "--data", str(data), "--out", str(out), "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())["benchmarks"][0]["top1"] / 100


def assert_learned(folder: Path, tmp_path: Path, learned: float = LEARNED) -> float:
    """val/top1 (logged by the run) far above chance; eval.py on the permuted folders near chance."""
    top1 = last_val_top1(folder)
    assert top1 > learned, f"val top-1 {top1:.3f}: the run did not learn"
    ckpt = folder / "checkpoints" / "last.ckpt"
    permuted = eval_top1(ckpt, permuted_copy(folder / "val_shapes", tmp_path / "permuted"), tmp_path / "p.json")
    assert permuted < CHANCE_MAX, f"top-1 {permuted:.3f} on permuted labels: the score is not about the classes"
    print(f"{folder}: val top-1 {top1:.3f}; permuted labels {permuted:.3f}")  # the figures, with -s
    return top1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--classes", "imagenet100"], "makes at most 48 distinct classes"),
        (["--model", "fake", "--classes", "imagenet100"], "--train.val_shapes makes at most 48"),
        (["--generator.seconds_per_image", "0"], "--generator.seconds_per_image must be > 0"),
        (["--generator.seconds_per_image", "-1"], "--generator.seconds_per_image must be > 0"),
        (["--model", "tiny", "--generator.seconds_per_image", "0.1"], "paces the built-in generators"),
        (["--train.val_dir", "{other}"], "was rendered for 3 other classes"),
        (["--train.val_dir", "{mine}"], "give one of the two"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_anything_starts(tmp_path, capsys, args, message):
    sets = {"{other}": ("imagenet100:3", tmp_path / "other"), "{mine}": ("imagenet100:10", tmp_path / "mine")}
    for i, arg in enumerate(args):
        if arg in sets:
            spec, folder = sets[arg]
            render_val_set(folder, load_classes(spec).keys, 1, 16)
            args[i] = str(folder)
    code = main(["--config", str(ROOT / SMOKE), "--out", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() and not descendants(os.getpid())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_smoke_run_learns_with_every_label_aligned(train_run, tmp_path):
    """Stream, one rank, two generators consuming in arrival order (units out of order), black
    images redrawn: every batch aligned, val top-1 far above chance, and eval.py on the permuted
    validation folders at chance. Measured (2 loaded cores): val top-1 0.67 at step 200."""
    run = train_run("--generators", "2", "--stream.order", "arrival", config=SMOKE, env=AUDIT)
    assert run.wait(840) == 0, run.output[-3000:]
    folder = run_folder(tmp_path)
    cfg = parse_config(["--config", str(ROOT / SMOKE)])
    assert assert_aligned(folder, cfg.stream.batch_size) == cfg.train.max_steps * cfg.stream.batch_size
    assert read_scalars(folder)["stream/redraws"][-1][1] > 0  # the forced black images were redrawn
    assert_learned(folder, tmp_path)


@pytest.mark.long
@pytest.mark.timeout(1200)
def test_two_ddp_ranks_learn_with_every_label_aligned(train_run, tmp_path):
    run = train_run("--generators", "1", "--trainers", "2", config=SMOKE, env=AUDIT)
    assert run.wait(1100) == 0, run.output[-3000:]
    folder = run_folder(tmp_path)
    assert set(read_audit(folder)) == {0, 1}
    ids = [row[1] for rows in read_audit(folder).values() for row in rows]
    assert len(ids) == len(set(ids))  # no id trained on by both ranks
    assert_aligned(folder, parse_config(["--config", str(ROOT / SMOKE)]).stream.batch_size)
    assert_learned(folder, tmp_path)


@pytest.mark.long
@pytest.mark.timeout(1200)
def test_a_cache_run_learns_with_every_label_aligned(train_run, tmp_path):
    cache = ["--source", "cache", "--cache.images", "1600", "--cache.dir", str(tmp_path / "cache")]
    run = train_run("--generators", "2", *cache, config=SMOKE, env=AUDIT)
    assert run.wait(1100) == 0, run.output[-3000:]
    folder = run_folder(tmp_path)
    rows = read_audit(folder)[0]
    assert max(r[1] for r in rows) < 1600 and len({r[1] for r in rows}) == 1600  # epochs over the cache
    assert_aligned(folder, parse_config(["--config", str(ROOT / SMOKE)]).stream.batch_size)
    assert_learned(folder, tmp_path)


@pytest.mark.long
@pytest.mark.timeout(1800)
def test_multicrop_with_the_trex_head_learns_with_every_label_aligned(train_run, tmp_path):
    """The multi-crop recipe with the t-ReX head learns more slowly than one crop and a linear head
    (its crops of a 32 px image are small and heavily jittered): 600 steps instead of the smoke's
    200. Measured val top-1 at step 600: 0.37 (0.18 / 0.25 / 0.33 / 0.38 / 0.37 at steps 100-500)
    and 0.24 in another run, on loaded cores (0.136 after a 200-step schedule; 0.27 with a linear
    head), chance 0.10; claimed: above 0.18, with the permuted control near chance."""
    recipe = ["--train.augment", "multicrop", "--train.head", "trex", "--train.local_crops", "2"]
    steps = ["--train.max_steps", "600", "--train.val_every", "200", "--train.checkpoint_every", "300"]
    run = train_run("--generators", "2", *recipe, *steps, config=SMOKE, env=AUDIT)
    assert run.wait(1700) == 0, run.output[-3000:]
    folder = run_folder(tmp_path)
    batch = parse_config(["--config", str(ROOT / SMOKE)]).stream.batch_size
    assert assert_aligned(folder, batch) == 600 * batch  # the stream images the crops were cut from
    assert_learned(folder, tmp_path, learned=0.18)


@pytest.mark.long
@pytest.mark.timeout(1500)
def test_a_run_stopped_by_sigterm_and_resumed_learns_with_every_label_aligned(train_run, tmp_path):
    first = train_run("--generators", "2", config=SMOKE, env=AUDIT)
    first.wait_for(" step=100/", 600)
    os.kill(first.proc.pid, signal.SIGTERM)
    assert first.wait(200) == 130, first.output[-3000:]
    stopped = run_folder(tmp_path)
    ckpt = stopped / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    trained = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]  # steps before the stop
    first_rows = read_audit(stopped)[0]
    # Resumed by its folder: it continues there (its audit file appended), no version_1.
    second = train_run("--generators", "2", "--resume", str(stopped), config=SMOKE, env=AUDIT)
    assert second.wait(1100) == 0, second.output[-3000:]
    assert not (stopped.parent / "version_1").exists()
    batch = parse_config(["--config", str(ROOT / SMOKE)]).stream.batch_size
    assert_aligned(stopped, batch)
    rows = read_audit(stopped)[0]
    assert rows[: len(first_rows)] == first_rows
    before = {r[1] for r in first_rows if r[0] < trained}
    after = {r[1] for r in rows[len(first_rows) :]}
    assert after and not before & after  # no id trained on twice across the resume
    assert_learned(stopped, tmp_path)
