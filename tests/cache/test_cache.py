"""The fixed cache: built by the stream's generators, bit-identical to the stream, resumable,
refused for another plan, reused, exported, and trained from in epochs (DDP, resume)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, ROOT, descendants, start_nodes

from streamgen.cache.layout import read_manifest
from streamgen.cache.reader import CacheReader, epoch_order
from streamgen.launch.cache_cli import main as cache_main
from streamgen.launch.launcher import main as train_main
from streamgen.train.cache_data import consumed_ids

SMOKE = str(ROOT / "configs/smoke_tiny.yaml")
FAKE = ("--model", "fake", "--generators", "1")
N = 96  # 12 units of 8 (smoke's stream.batch_size), shards of 4 units: 3 shards


def cache_args(folder: Path, images: int = N, *extra: str) -> list[str]:
    return ["--config", SMOKE, *FAKE, "--cache.images", str(images), "--cache.dir", str(folder), *extra]


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory) -> Path:
    """A finished cache of the smoke plan with the fake generator, built by the CLI."""
    folder = tmp_path_factory.mktemp("fake") / "cache"
    assert cache_main(["build", *cache_args(folder)]) == 0
    return folder


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.bin"))}


@pytest.mark.timeout(300)
def test_the_cache_holds_the_pixels_labels_and_ids_the_stream_delivers(tmp_path):
    """Tiny diffusion: the same units made through the stream (queue) and through the cache."""
    from streamgen.cache.build import build_cache
    from streamgen.config import parse_config
    from streamgen.launch.checks import prepare
    from streamgen.plan.samples import UnitCursor, unit_ids
    from streamgen.stream.queue import FILLED
    from streamgen.stream.supervisor import Supervisor
    from streamgen.stream.worker import WorkerSpec

    args = [
        "--config",
        SMOKE,
        "--generator.resolution",
        "32",
        "--generator.steps",
        "2",
        "--stream.resolution",
        "16",
        "--train.crop",
        "16",
    ]
    args += [
        "--source",
        "cache",
        "--cache.images",
        "16",
        "--cache.dir",
        str(tmp_path / "c"),
        "--cache.shard_units",
        "2",
    ]
    job = prepare(parse_config(args))
    cfg = job.cfg
    worker = WorkerSpec(0, 0, "cpu", 1, job.model, cfg.generator, job.plan, 8, 16)
    build_cache(job.cache, worker, ["cpu", "cpu"], 4, log=lambda m: None)  # two generators, units interleaved
    reader = CacheReader.open(tmp_path / "c")

    supervisor = Supervisor(worker, ["cpu"], [UnitCursor(0, 1)], 3, log=lambda m: None)
    streamed = {}
    try:
        supervisor.start()
        queue = supervisor.queues[0]
        while len(streamed) < 2:
            supervisor.poll(0.5, extra=[queue.filled])
            while queue.count(FILLED):
                slot = queue.get()
                view = queue.view(slot)
                streamed[queue.unit(slot)] = (view.images.clone(), view.labels.clone(), view.ids.clone())
                queue.release(slot)
    finally:
        supervisor.shutdown()
    for unit in range(2):
        images, labels, ids = reader.gather(unit_ids(unit, 8))
        assert torch.equal(ids, streamed[unit][2]) and torch.equal(labels, streamed[unit][1])
        assert torch.equal(images, streamed[unit][0])  # bit for bit
        assert images.float().std() > 0  # real (noise-like) images, not blanks


@pytest.mark.timeout(300)
def test_a_build_killed_mid_shard_resumes_to_the_same_cache(tmp_path, fake_cache):
    folder = tmp_path / "killed"
    big = 1024  # 32 shards: long enough to be killed while it runs
    whole = tmp_path / "whole"
    assert cache_main(["build", *cache_args(whole, big)]) == 0
    cmd = [PYTHON, "-m", "streamgen.cache", "build", *cache_args(folder, big)]
    # Generator 0 stops itself (SIGSTOP) at unit 5, so the build waits with shard 0 written and shard 1
    # half-written: a moment that lasts (a free-running fake build can finish between two polls).
    env = {**os.environ, "STREAMGEN_INJECT_FAULT": "stop:0:5"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (list(folder.glob("shard-*.bin")) and list(folder.glob(".shard-*.tmp"))):
            assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the build and its generators, mid-shard
    finally:
        proc.wait(10)
    done_before = len(list(folder.glob("shard-*.bin")))
    assert 0 < done_before < 32 and not (folder / "manifest.json").exists()
    assert cache_main(["build", *cache_args(folder, big)]) == 0  # resumes: makes only the rest
    assert not list(folder.glob(".shard-*"))  # the killed build's partial shard was swept
    assert shard_bytes(folder) == shard_bytes(whole)
    a, b = read_manifest(whole), read_manifest(folder)
    assert a["shards"] == b["shards"] and a["fingerprint"] == b["fingerprint"]
    sessions = b["build"]["sessions"]
    assert len(sessions) == 2 and b["build"]["devices"] == 1
    assert b["build"]["device_seconds"] == pytest.approx(sum(s["devices"] * s["seconds"] for s in sessions))
    assert cache_main(["verify", "--config", SMOKE, "--cache.dir", str(folder)]) == 0


@pytest.mark.timeout(300)
def test_a_generator_killed_during_the_build_is_restarted_and_the_cache_is_the_same(
    tmp_path, fake_cache, monkeypatch, capsys
):
    monkeypatch.setenv("STREAMGEN_INJECT_FAULT", "kill:0:5")  # generator 0 SIGKILLs itself mid-unit
    folder = tmp_path / "survived"
    assert cache_main(["build", *cache_args(folder), "--stream.restart_backoff", "0.1"]) == 0
    assert "generator 0 (cpu) died (killed by signal 9)" in capsys.readouterr().err
    assert shard_bytes(folder) == shard_bytes(fake_cache)


@pytest.mark.timeout(300)
def test_verify_finds_a_corrupted_shard_and_info_describes_the_cache(tmp_path, fake_cache, capsys):
    folder = tmp_path / "copy"
    folder.mkdir()
    for p in fake_cache.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    assert cache_main(["info", *cache_args(folder)]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["complete"] and described["shards_complete"] == described["shards_needed"] == 3
    assert described["manifest"]["layout"]["images"] == N
    shard = folder / "shard-000001.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cache_main(["verify", "--config", SMOKE, "--cache.dir", str(folder)]) == 1
    assert "shard-000001.bin: sha256 differs" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_a_cache_of_another_plan_is_refused_and_nothing_starts(tmp_path, fake_cache, capsys):
    before, children = set(fake_cache.iterdir()), set(descendants(os.getpid()))
    code = train_main(["--source", "cache", *cache_args(fake_cache), "--seed", "1", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "holds a cache of another plan: --seed is 0 in the cache but 1 in this run" in err
    assert cache_main(["build", *cache_args(fake_cache), "--prompt", "c"]) == 2
    assert "--prompt is 'c_hc_b' in the cache but 'c' in this run" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and set(fake_cache.iterdir()) == before
    assert set(descendants(os.getpid())) <= children


@pytest.mark.timeout(300)
def test_export_writes_an_imagefolder_and_webdataset_shards(tmp_path, fake_cache):
    import webdataset as wds
    from torchvision.datasets import ImageFolder

    from streamgen.config import parse_config
    from streamgen.launch.checks import prepare

    plan = prepare(parse_config(["--source", "cache", *cache_args(fake_cache)])).plan
    reader = CacheReader.open(fake_cache)
    images, labels, _ = reader.gather(np.arange(N))
    tree = tmp_path / "tree"
    assert cache_main(["export", *cache_args(fake_cache), "--to", str(tree), "--format", "imagefolder"]) == 0
    folder = ImageFolder(str(tree))  # torchvision's loader is the oracle
    assert len(folder) == N
    rows = [json.loads(line) for line in (tree / "samples.jsonl").read_text().splitlines()]
    by_path = {row["path"]: row for row in rows}
    for path, _ in folder.samples[:20]:
        row = by_path[str(Path(path).relative_to(tree))]
        i = row["id"]
        assert np.array_equal(np.asarray(folder.loader(path)).transpose(2, 0, 1), images[i].numpy())
        sample = plan.samples([i])[0]
        assert (row["class"], row["prompt"], row["seed"]) == (sample.key, sample.prompt, sample.seed)
        assert Path(path).parent.name == sample.key and row["label"] == labels[i]

    shards = tmp_path / "wds"
    assert cache_main(["export", *cache_args(fake_cache), "--to", str(shards), "--format", "webdataset"]) == 0
    tars = sorted(str(p) for p in shards.glob("*.tar"))
    seen = 0
    for sample in wds.WebDataset(tars, shardshuffle=False).decode("rgb8"):
        meta, i = sample["json"], int(sample["__key__"])
        assert meta["id"] == i and meta["prompt"] == plan.samples([i])[0].prompt
        assert np.array_equal(sample["png"].transpose(2, 0, 1), images[i].numpy())
        seen += 1
    assert seen == N


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_epochs_over_two_ranks_visit_every_sample_once_and_resume_exactly(train_run, tmp_path, fake_cache):
    """Two DDP ranks on a reused cache: each epoch covers 0..N-1 once; resume mid-epoch matches."""
    mtimes = {p.name: p.stat().st_mtime_ns for p in fake_cache.iterdir()}
    args = ("--source", "cache", *cache_args(fake_cache)[2:], "--trainers", "2", "--train.epochs", "2")
    args += ("--train.checkpoint_every", "8", "--train.log_every", "3")
    whole = train_run(*args, "--name", "whole")
    assert whole.wait(400) == 0, whole.output[-3000:]
    assert "building the cache" not in whole.output and "complete" in whole.output  # reused, not rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in fake_cache.iterdir()} == mtimes
    run_dir = tmp_path / "runs" / "whole" / "version_0"
    rows = {r: consumed_ids(run_dir / f"consumed-rank{r}.tsv") for r in (0, 1)}
    steps_per_epoch = N // 2 // 8
    assert [row[:3] for row in rows[0]] == [(s, s // steps_per_epoch, s % steps_per_epoch) for s in range(12)]
    for epoch in range(2):
        ids = [i for r in (0, 1) for _, e, _, batch in rows[r] if e == epoch for i in batch]
        assert sorted(ids) == list(range(N))  # every sample exactly once across the two ranks
    order = epoch_order(0, 1, N)  # the seed fixes the order: rank 1's epoch 1 is positions 1, 3, ...
    assert [i for _, e, _, batch in rows[1] if e == 1 for i in batch] == order[1::2].tolist()

    ckpt = run_dir / "checkpoints" / "step0000008.ckpt"  # epoch 1, batch 2: mid-epoch
    state = torch.load(ckpt, weights_only=True)["CacheDataModule"]
    assert sorted((p["rank"], p["epoch"], p["batches"]) for p in state["positions"]) == [(0, 1, 2), (1, 1, 2)]
    resumed = train_run(*args, "--name", "whole", "--resume", str(ckpt))
    assert resumed.wait(400) == 0, resumed.output[-3000:]
    assert not (tmp_path / "runs" / "whole" / "version_1").exists()  # it continues in its own folder
    for r in (0, 1):  # steps 8.. redone exactly, each once in the audit trail
        assert consumed_ids(run_dir / f"consumed-rank{r}.tsv") == rows[r]


# -- bad input: one line, exit 2, nothing started or created ---------------------------------


def _refused(capsys, tmp_path, args: list[str], message: str, main=train_main) -> None:
    children = set(descendants(os.getpid()))  # e.g. multiprocessing's resource tracker, from earlier tests
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    assert set(descendants(os.getpid())) <= children


def _cache_run(tmp_path: Path, *extra: str) -> list[str]:
    return ["--config", SMOKE, *FAKE, "--source", "cache", "--out", str(tmp_path / "runs"), *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cache.images", "0"], "--cache.images must be at least 1 (got 0)"),
        (["--cache.images", "-5"], "--cache.images must be"),
        (["--cache.scale", "0"], "--cache.scale must be > 0"),
        ([], "--source cache needs a size"),
        (["--cache.images", "4", "--cache.scale", "1"], "not both"),
        (["--cache.images", "8", "--trainers", "2"], "has no batch of 8 for each of 2 trainer ranks"),
    ],
)
def test_bad_cache_sizes_are_refused(tmp_path, capsys, extra, message):
    _refused(capsys, tmp_path, _cache_run(tmp_path, "--cache.dir", str(tmp_path / "cache"), *extra), message)


def test_a_cache_without_a_folder_is_refused(tmp_path, capsys):
    _refused(capsys, tmp_path, _cache_run(tmp_path, "--cache.images", "16"), "needs --cache.dir")


def test_a_cache_folder_that_cannot_be_made_is_refused(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    args = _cache_run(tmp_path, "--cache.images", "16", "--cache.dir", str(afile / "cache"))
    _refused(capsys, tmp_path, args, "is a file, so no folder can be made there")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_cache_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(0o555)
    args = _cache_run(tmp_path, "--cache.images", "16", "--cache.dir", str(locked / "cache"))
    _refused(capsys, tmp_path, args, "is not writable")


def test_a_disk_without_room_is_refused_with_the_size_needed(tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    args = _cache_run(tmp_path, "--cache.images", "1000000", "--cache.dir", str(tmp_path / "cache"))
    _refused(capsys, tmp_path, args, "the cache needs 2.88 GiB more but")  # 10^6 x (3 x 32 x 32 + 16) bytes


def test_an_export_target_that_exists_is_refused(tmp_path, capsys):
    target = tmp_path / "out"
    target.mkdir()
    args = ["export", *cache_args(tmp_path / "cache"), "--to", str(target)]
    _refused(capsys, tmp_path, args, f"--to {target} exists", main=cache_main)
    assert list(target.iterdir()) == []


def test_resuming_a_cache_run_with_other_settings_is_refused(tmp_path, capsys):
    state = {"format": "streamgen-cache/1", "classes": None, "class_spec": "imagenet100:10", "seed": 0}
    state |= {"unit_size": 8, "world": 1, "source": "cache", "images": 96, "positions": [{"rank": 0, "epoch": 1}]}
    from streamgen.plan.classes import load_classes

    state["classes"] = load_classes("imagenet100:10").fingerprint()
    ckpt = tmp_path / "cache.ckpt"
    torch.save({"CacheDataModule": state}, ckpt)
    run = _cache_run(tmp_path, "--cache.dir", str(tmp_path / "cache"), "--resume", str(ckpt))
    _refused(capsys, tmp_path, [*run, "--cache.images", "160"], "the checkpoint's cache run has --cache.images 96")
    _refused(capsys, tmp_path, [*run, "--cache.images", "96", "--seed", "3"], "has --seed 0; resume with the same")
    stream = tmp_path / "stream.ckpt"
    torch.save({"StreamDataModule": {"format": "streamgen-stream/1"}}, stream)
    args = _cache_run(tmp_path, "--cache.dir", str(tmp_path / "cache"), "--cache.images", "96", "--resume", str(stream))
    _refused(capsys, tmp_path, args, "not a checkpoint of a cache run")


# -- several nodes build one cache into a shared folder ---------------------------------------


def test_the_nodes_split_the_shards_disjointly_and_write_distinct_files(tmp_path):
    from streamgen.cache.layout import Layout, node_shards, progress_name

    shards = list(range(11))
    split = [node_shards(shards, 3, k) for k in range(3)]
    assert split == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]  # round robin: balanced within one shard
    assert node_shards([1, 2, 5, 7], 2, 1) == [1, 5, 7]  # a resumed build: each node its missing ones
    assert node_shards(shards, 1, 0) == shards
    assert [progress_name(3, k) for k in range(3)] == [f"progress-node{k}.json" for k in range(3)]
    assert progress_name(1, 0) == "progress.json"  # a single node's build, as before
    layout = Layout(str(tmp_path), 96, 8, 32, 4)
    assert layout.temp_path(1, "node0-7") != layout.temp_path(1, "node1-7")  # the same pid on two machines


@pytest.mark.timeout(300)
def test_a_node_whose_cache_folder_is_not_shared_stops_with_one_line(tmp_path, fake_cache, capsys):
    """Node 1 of 2 alone in its folder: it makes its shards, then says why the rest never come."""
    folder = tmp_path / "local"
    node1 = ["--dist.nodes", "2", "--dist.node_rank", "1", "--dist.master_addr", "127.0.0.1", "--dist.timeout", "3"]
    started = time.monotonic()
    assert cache_main(["build", *cache_args(folder), *node1]) == 1
    assert time.monotonic() - started < 120  # bounded by --dist.timeout, not a hang
    err = [line for line in capsys.readouterr().err.splitlines() if "cache.dir must be a folder shared" in line]
    assert len(err) == 1 and f"--cache.dir {folder}" in err[0], err
    assert shard_bytes(folder) == {"shard-000001.bin": shard_bytes(fake_cache)["shard-000001.bin"]}  # its share
    progress = json.loads((folder / "progress-node1.json").read_text())
    assert progress["done"] and list(progress["sha256"]) == ["shard-000001.bin"]
    assert not (folder / "manifest.json").exists() and not list(folder.glob(".shard-*"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_build_one_shared_cache_and_train_from_it(train_run, tmp_path, fake_cache):
    """Two launchers on localhost (train.py --source cache): each node makes its own shards into
    one folder; the cache equals a single node's, bit for bit; the two ranks then read it."""

    shared = tmp_path / "shared"
    args = ("--source", "cache", *cache_args(shared)[2:], "--trainers", "1", "--train.max_steps", "6")
    nodes = start_nodes(train_run, 2, *args, "--name", "two")
    for node in nodes:
        assert node.wait(500) == 0, node.output[-3000:]
    assert shard_bytes(shared) == shard_bytes(fake_cache)  # the single-node build of the same config

    made = {k: json.loads((shared / f"progress-node{k}.json").read_text()) for k in (0, 1)}
    assert sorted(made[0]["sha256"]) == ["shard-000000.bin", "shard-000002.bin"]  # shards s % 2 == 0
    assert sorted(made[1]["sha256"]) == ["shard-000001.bin"]
    assert not (shared / "progress.json").exists() and not list(shared.glob(".shard-*"))
    manifest, single = read_manifest(shared), read_manifest(fake_cache)
    assert manifest["shards"] == single["shards"] and manifest["fingerprint"] == single["fingerprint"]
    build = manifest["build"]
    assert build["nodes"] == 2 and build["devices"] == 2 and {s["node"] for s in build["sessions"]} == {0, 1}
    assert build["device_seconds"] == pytest.approx(made[0]["device_seconds"] + made[1]["device_seconds"])
    assert made[0]["device_seconds"] > 0 and made[1]["device_seconds"] > 0
    assert cache_main(["verify", "--config", SMOKE, "--cache.dir", str(shared)]) == 0

    run_dir = tmp_path / "runs" / "two" / "version_0"  # global rank r reads positions r, r + 2, ... of epoch 0
    order = epoch_order(0, 0, N)
    for r in (0, 1):
        ids = [i for _, _, _, batch in consumed_ids(run_dir / f"consumed-rank{r}.tsv") for i in batch]
        assert ids == order[r::2].tolist()


def test_the_cache_cli_help_is_plain_text_and_a_missing_command_is_one_clear_line(capsys):
    assert cache_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "build: make the run's cache (--cache.images or --cache.scale" in out and "``" not in out and "`" not in out
    assert cache_main(["--config", SMOKE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "invalid choice" not in err
    assert err == (
        f"python -m streamgen.cache: error: {SMOKE!r} is not a command: give one first: "
        "python -m streamgen.cache {build,info,verify,export} --config FILE [--KEY VALUE ...]"
    )
