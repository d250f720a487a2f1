"""Integrity and safety of the cache (issue 24): class names that cannot escape a folder, an
export that writes only inside its target and never deletes what it did not make, damaged
shards named before a run trains on them, one builder per folder, a full disk, bad input."""

import errno
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, descendants

from streamgen.cache import build as build_module
from streamgen.cache import export as export_module
from streamgen.cache.layout import read_manifest
from streamgen.errors import UsageError
from streamgen.launch.cache_cli import main as cache_main
from streamgen.launch.launcher import main as train_main
from streamgen.plan.classes import ClassInfo, ClassSet, load_classes

SMOKE = str(ROOT / "configs/smoke_tiny.yaml")
FAKE = ("--model", "fake", "--generators", "1")
N = 96  # 3 shards of 32 images (smoke: batches of 8, 4 units a shard)


def cache_args(folder: Path, *extra: str) -> list[str]:
    return ["--config", SMOKE, *FAKE, "--cache.images", str(N), "--cache.dir", str(folder), *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("integrity") / "cache"
    assert cache_main(["build", *cache_args(folder)]) == 0
    return folder


def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# -- class names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, why",
    [
        ("../../../escaped_by_class", "path separator"),
        ("/tmp/absolute_class", "path separator"),
        ("..", "relative folder name"),
        ("bell\x1b[31m", "control character"),
        ("a\\b", "path separator"),
    ],
)
def test_a_class_name_that_could_escape_a_folder_is_refused_at_load_time(tmp_path, name, why):
    csv = tmp_path / "classes.csv"
    csv.write_text(f'name,description\n"{name}",x\nplain,y\n')
    with pytest.raises(UsageError, match=why) as e:
        load_classes(str(csv))
    assert "\n" not in str(e.value)


def test_a_traversal_class_name_is_refused_before_a_build_creates_anything(tmp_path, capsys):
    csv = tmp_path / "classes.csv"
    csv.write_text("name,description\n../../../escaped_by_class,x\nplain,y\n")
    code = cache_main(["build", *cache_args(tmp_path / "cache", "--classes", str(csv))])
    assert code == 2 and "'../../../escaped_by_class' holds a path separator" in one_line(capsys)
    assert not (tmp_path / "cache").exists() and not (tmp_path.parent / "escaped_by_class").exists()


def test_export_writes_only_inside_its_target_whatever_the_class_names(tmp_path, built):
    """The plan's keys bypass load_classes here (as a tampered manifest or plan would): export's
    own containment check stops the write, and nothing lands outside the target."""
    from streamgen.cache.reader import CacheReader
    from streamgen.plan.prompts import PromptTemplate
    from streamgen.plan.samples import SamplePlan

    classes = load_classes("imagenet100:10")
    evil = ClassSet("evil", tuple(ClassInfo(f"../../escaped{i}", "x", "", "y") for i in range(len(classes))))
    plan = SamplePlan(evil, PromptTemplate.parse("c"), 0)
    target = tmp_path / "a" / "b" / "exp"
    with pytest.raises(UsageError, match="would be written outside"):
        export_module.export(CacheReader.open(built), plan, target, "imagefolder")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"]  # no escaped*, no exp.partial


def test_a_users_partial_folder_survives_an_export(tmp_path, built, capsys):
    target = tmp_path / "X"
    partial = tmp_path / "X.partial"
    partial.mkdir()
    (partial / "important.txt").write_text("mine")
    code = cache_main(["export", *cache_args(built), "--to", str(target)])
    assert code == 2 and "X.partial exists and was not made by an export" in one_line(capsys)
    assert (partial / "important.txt").read_text() == "mine" and not target.exists()


def test_a_partial_folder_left_by_a_killed_export_is_replaced(tmp_path, built):
    target = tmp_path / "X"
    partial = tmp_path / "X.partial"
    partial.mkdir()
    (partial / export_module.MARKER).write_text("1234\n")
    (partial / "old.png").write_text("")
    assert cache_main(["export", *cache_args(built), "--to", str(target)]) == 0
    assert not partial.exists() and not (target / "old.png").exists() and not (target / export_module.MARKER).exists()
    assert len(list(target.rglob("*.png"))) == N


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_export_says_so_in_one_line_and_leaves_nothing(tmp_path, built, capsys, monkeypatch, signum):
    calls = []
    png = export_module._png

    def png_then_signal(image):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signum)
            time.sleep(0.5)  # the handler runs here
        return png(image)

    monkeypatch.setattr(export_module, "_png", png_then_signal)
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = cache_main(["export", *cache_args(built), "--to", str(tmp_path / "X")])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and "interrupted: nothing was exported" in one_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_exporting_a_truncated_shard_is_one_line(tmp_path, built, capsys):
    folder = copy_cache(built, tmp_path / "cache")
    shard = folder / "shard-000001.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    code = cache_main(["export", *cache_args(folder), "--to", str(tmp_path / "X")])
    assert code == 2 and "shard-000001.bin is 1000 bytes, not" in one_line(capsys)
    assert not (tmp_path / "X").exists() and not (tmp_path / "X.partial").exists()


# -- damaged shards: named before any training -------------------------------------------------


def _train_refused(capsys, tmp_path, folder: Path, message: str) -> None:
    children = set(descendants(os.getpid()))
    code = train_main(["--source", "cache", *cache_args(folder), "--out", str(tmp_path / "runs")])
    err = one_line(capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "runs").exists() and set(descendants(os.getpid())) <= children


def test_a_flipped_image_byte_is_found_before_training(tmp_path, built, capsys):
    folder = copy_cache(built, tmp_path / "cache")
    shard = folder / "shard-000002.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    _train_refused(capsys, tmp_path, folder, "shard-000002.bin differs from the sha256 its build recorded")


def test_a_flipped_label_byte_is_found_before_training(tmp_path, built, capsys):
    folder = copy_cache(built, tmp_path / "cache")
    shard = folder / "shard-000000.bin"
    data = bytearray(shard.read_bytes())
    data[32 * 3 * 32 * 32 + 7] ^= 0x40  # the high byte of the first label: far out of range
    shard.write_bytes(bytes(data))
    _train_refused(capsys, tmp_path, folder, "shard-000000.bin holds a label outside 0..")


def test_a_reader_range_checks_labels_when_it_opens_a_shard(tmp_path, built):
    from streamgen.cache.layout import CacheDamaged
    from streamgen.cache.reader import CacheReader

    folder = copy_cache(built, tmp_path / "cache")
    shard = folder / "shard-000001.bin"
    data = bytearray(shard.read_bytes())
    data[32 * 3 * 32 * 32] = 200  # label 200 of a 10-class set
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheDamaged, match="shard-000001.bin holds a label outside 0..9"):
        CacheReader.open(folder, classes=10)


@pytest.mark.parametrize("text", ["[]", '{"layout": 3}', '{"layout": {"images": 96}, "shards": []}'])
def test_a_manifest_that_is_not_one_is_one_line(tmp_path, built, capsys, text):
    folder = copy_cache(built, tmp_path / "cache")
    (folder / "manifest.json").write_text(text)
    assert cache_main(["verify", *cache_args(folder)]) == 2
    assert "manifest.json is not" in one_line(capsys)
    code = cache_main(["export", *cache_args(folder), "--to", str(tmp_path / "X")])
    assert code == 2 and "manifest.json is not" in one_line(capsys)


# -- building: one builder per folder, a full disk -------------------------------------------


def test_a_second_build_into_the_same_folder_waits_and_names_the_holder(tmp_path):
    from streamgen.cache.build import folder_lock

    lines: list[str] = []
    got = threading.Event()
    with folder_lock(tmp_path, 1, 0, lines.append):

        def second() -> None:
            with folder_lock(tmp_path, 1, 0, lines.append):
                got.set()

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        assert not got.is_set()  # it waits while the first holds the lock
    thread.join(5)
    assert got.is_set()
    assert len(lines) == 1 and f"being built by pid {os.getpid()} on" in lines[0]


@pytest.mark.timeout(300)
def test_a_full_disk_during_a_build_is_one_line_and_keeps_the_finished_shards(tmp_path, built, capsys, monkeypatch):
    folder = tmp_path / "cache"
    writes = []
    real = build_module._pwrite_all

    def fill_up(fd, array, offset):
        writes.append(1)
        if len(writes) > 4 * 3:  # the first shard's 4 units (3 writes each), then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, array, offset)

    monkeypatch.setattr(build_module, "_pwrite_all", fill_up)
    code = cache_main(["build", *cache_args(folder)])
    err = capsys.readouterr().err
    assert code == 1
    line = [x for x in err.splitlines() if "is full" in x]
    assert len(line) == 1 and "the 1 finished shard(s) are kept" in line[0] and "Traceback" not in err
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-000000.bin"]
    assert not list(folder.glob(".*.tmp")) and read_manifest(folder) is None
    assert json.loads((folder / "progress.json").read_text())["sha256"].keys() == {"shard-000000.bin"}
    assert (folder / "shard-000000.bin").read_bytes() == (built / "shard-000000.bin").read_bytes()
    monkeypatch.setattr(build_module, "_pwrite_all", real)
    assert cache_main(["build", *cache_args(folder)]) == 0  # and the build goes on
    assert [(folder / p.name).read_bytes() == p.read_bytes() for p in built.glob("shard-*")] == [True] * 3


# -- bad input of the cache command line -----------------------------------------------------


def test_an_unknown_command_or_format_is_one_line(tmp_path, capsys):
    assert cache_main(["frobnicate"]) == 2 and "'frobnicate' is not a command" in one_line(capsys)
    code = cache_main(["export", *cache_args(tmp_path / "cache"), "--to", str(tmp_path / "X"), "--format", "foo"])
    assert code == 2 and "--format 'foo' is not one of imagefolder, webdataset" in one_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_verifying_a_folder_that_does_not_exist_is_a_usage_error(tmp_path, capsys):
    code = cache_main(["verify", "--config", SMOKE, "--cache.dir", str(tmp_path / "nonexistent")])
    out_err = capsys.readouterr()
    assert code == 2 and out_err.out == "" and "is not a folder" in out_err.err


@pytest.mark.timeout(60)
def test_a_cache_of_a_trillion_images_is_refused_at_once(tmp_path, capsys):
    started = time.monotonic()
    code = train_main(
        ["--source", "cache", *cache_args(tmp_path / "cache")[:-4], "--cache.images", "1000000000000",
         "--cache.dir", str(tmp_path / "cache"), "--out", str(tmp_path / "runs")]
    )  # fmt: skip
    assert code == 2 and "the cache needs" in one_line(capsys)
    assert time.monotonic() - started < 20 and list(tmp_path.iterdir()) == []


def test_the_shard_check_costs_about_a_second_per_gigabyte(tmp_path):
    """The cost of the first-map sha256 check, measured (printed with -s): hashing is what it is."""
    from streamgen.cache.build import sha256_file

    path = tmp_path / "blob"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes())
    started = time.monotonic()
    sha256_file(path)
    rate = 64 / (time.monotonic() - started)
    print(f"sha256: {rate:.0f} MiB/s on one core")
    assert rate > 50


def test_verify_false_skips_the_digests_but_not_the_labels(tmp_path, built):
    from streamgen.config import parse_config
    from streamgen.launch.checks import prepare

    folder = copy_cache(built, tmp_path / "cache")
    shard = folder / "shard-000002.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # a pixel: only the sha256 sees it
    shard.write_bytes(bytes(data))
    args = ["--source", "cache", *cache_args(folder), "--out", str(tmp_path / "runs")]
    assert prepare(parse_config([*args, "--cache.verify", "false"])).cache.complete
    with pytest.raises(UsageError, match="shard-000002.bin differs"):
        prepare(parse_config(args))


@pytest.mark.long  # two builds in processes; the lock itself: test_a_second_build_into_the_same_folder_waits...
@pytest.mark.timeout(400)
def test_two_builds_started_together_into_one_folder_both_succeed(tmp_path, built):
    """The issue's race: two `cache build` at once into one --cache.dir. One builds, the other
    waits on the folder's lock (naming the holder), then finds the cache finished."""
    import subprocess

    from conftest import PYTHON

    folder = tmp_path / "cache"
    cmd = [PYTHON, "-m", "streamgen.cache", "build", *cache_args(folder)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=350)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sum("is being built by pid" in e for e in errs) <= 1 and not any("Traceback" in e for e in errs)
    assert [(folder / p.name).read_bytes() == p.read_bytes() for p in sorted(built.glob("shard-*"))] == [True] * 3
    assert not list(folder.glob(".*.tmp"))


def test_a_trainers_cache_source_range_checks_labels_when_it_opens_the_shards(tmp_path, built):
    """A shard damaged after the launcher's check: the rank's source names it (one line), no IndexError."""
    from streamgen.cache.layout import CacheDamaged, manifest_layout
    from streamgen.train.cache_data import CacheDataModule

    folder = copy_cache(built, tmp_path / "cache")
    shard = folder / "shard-000000.bin"
    data = bytearray(shard.read_bytes())
    data[32 * 3 * 32 * 32] = 77  # the first label: 77 of 10 classes
    shard.write_bytes(bytes(data))
    layout = manifest_layout(folder, read_manifest(folder))
    dm = CacheDataModule(layout, 0, 8, rank=0, world=1, run_meta={}, crop=8, classes=10)
    with pytest.raises(CacheDamaged, match="shard-000000.bin holds a label outside 0..9"):
        dm.reader()
