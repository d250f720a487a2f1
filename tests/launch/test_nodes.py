"""Placement of a node from flags / SLURM / torchrun variables, and the launchers' handshake."""

import socket
import threading
import time
from pathlib import Path

import pytest

from streamgen.config import DistConfig
from streamgen.errors import UsageError
from streamgen.launch.nodes import NodeGroup, Placement, first_difference, resolve_placement, slurm_first_host

SECRET = b"a secret the nodes of the test share"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_node_by_default():
    p = resolve_placement(DistConfig(), env={})
    assert (p.nodes, p.node_rank, p.source) == (1, 0, "single")


def test_slurm_variables_alone_place_a_node():
    env = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-09,12]", "SLURM_NTASKS": "4"}
    p = resolve_placement(DistConfig(), env=env)
    assert (p.nodes, p.node_rank, p.master_addr, p.master_port, p.source) == (4, 2, "gpu07", 29500, "slurm")
    assert resolve_placement(DistConfig(), env={**env, "MASTER_PORT": "31000"}).master_port == 31000


def test_torchrun_variables_and_flags_override():
    env = {"WORLD_SIZE": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400"}
    p = resolve_placement(DistConfig(), env=env)
    assert (p.nodes, p.node_rank, p.master_addr, p.master_port, p.source) == (2, 1, "10.1.2.3", 29400, "torchrun")
    p = resolve_placement(DistConfig(nodes=3, node_rank=0, master_addr="h0", master_port=5000), env=env)
    assert (p.nodes, p.node_rank, p.master_addr, p.master_port, p.source) == (3, 0, "h0", 5000, "flags")


@pytest.mark.parametrize(
    "dist, env, message",
    [
        (DistConfig(nodes=2, node_rank=2, master_addr="h"), {}, "node rank 2 is out of range for 2 node(s)"),
        (DistConfig(nodes=0), {}, "at least 1 node"),
        (DistConfig(nodes=2, node_rank=1), {}, "needs node 0's address"),
        (DistConfig(), {"SLURM_NNODES": "x", "SLURM_NODEID": "0"}, "SLURM_NNODES='x' is not an integer"),
    ],
)
def test_bad_placements_are_one_line(dist, env, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_placement(dist, env=env)


@pytest.mark.parametrize(
    "nodelist, first", [("node1", "node1"), ("gpu[07-09,12]", "gpu07"), ("a[3,5],b1", "a3"), ("x-1,x-2", "x-1")]
)
def test_slurm_first_host(nodelist, first):
    assert slurm_first_host(nodelist) == first


def test_first_difference_names_the_key():
    assert first_difference({"a": 1, "t": {"lr": 0.1}}, {"a": 1, "t": {"lr": 0.2}}) == "t.lr"
    assert first_difference({"a": 1}, {"a": 1}) is None


def _join_all(configs: list[dict], port: int, timeout: float = 20) -> list:
    """Each config joins as one node, in its own thread; returns each node's group or error."""
    results: list = [None] * len(configs)

    def node(rank: int) -> None:
        group = NodeGroup(Placement(len(configs), rank, "127.0.0.1", port, "flags"), timeout, SECRET)
        try:
            group.join(configs[rank])
            results[rank] = group
        except UsageError as e:
            results[rank] = e

    threads = [threading.Thread(target=node, args=(r,)) for r in range(len(configs))]
    for t in threads:
        t.start()
        time.sleep(0.2)  # node 0 first, as in practice (the others retry until it listens)
    for t in threads:
        t.join(60)
    return results


@pytest.mark.timeout(60)
def test_nodes_with_the_same_config_join_and_share_the_run_folder():
    config = {"seed": 0, "dist": {"nodes": 2, "node_rank": None}, "train": {"lr": 0.1}}
    a, b = _join_all(
        [dict(config, dist={"nodes": 2, "node_rank": 0}), dict(config, dist={"nodes": 2, "node_rank": 1})],
        free_port() - 1,
    )
    assert isinstance(a, NodeGroup) and isinstance(b, NodeGroup)
    shared = {}
    reader = threading.Thread(target=lambda: shared.setdefault("b", b.share("run_dir")))
    reader.start()
    assert a.share("run_dir", "/runs/x/version_3") == "/runs/x/version_3"
    reader.join(10)
    assert shared["b"] == "/runs/x/version_3"
    assert a.lost_peer(force=True) is None and b.lost_peer(force=True) is None


@pytest.mark.timeout(60)
def test_a_node_with_another_config_is_refused_naming_the_key():
    a, b = _join_all([{"train": {"lr": 0.1}}, {"train": {"lr": 0.2}}], free_port() - 1)
    assert isinstance(a, UsageError) and isinstance(b, UsageError)
    assert "train.lr is 0.2 there and 0.1 here" in str(a)
    assert "train.lr is 0.1 there and 0.2 here" in str(b)


@pytest.mark.timeout(60)
def test_an_unreachable_master_is_a_clear_error_within_the_timeout():
    group = NodeGroup(Placement(2, 1, "127.0.0.1", free_port() - 1, "flags"), timeout=2, secret=SECRET)
    started = time.monotonic()
    with pytest.raises(UsageError, match="cannot reach node 0 at 127.0.0.1"):
        group.join({})
    assert time.monotonic() - started < 30


@pytest.mark.timeout(60)
def test_a_silent_peer_is_named():
    # Joined with the default patience (a loaded machine may take seconds to join), judged stale
    # after 3 s of silence (launchers beat every second).
    a, b = _join_all([{}, {}], free_port() - 1)
    assert isinstance(a, NodeGroup) and isinstance(b, NodeGroup), (a, b)
    time.sleep(4)
    assert a.lost_peer(force=True, stale_after=3) is None  # node 1's launcher beats from its own thread
    b.close()  # ... until it stops, as a hung or killed launcher does
    deadline = time.monotonic() + 15
    lost = None
    while lost is None and time.monotonic() < deadline:
        lost = a.lost_peer(force=True, stale_after=3)
        time.sleep(0.3)
    assert lost is not None and lost.startswith("lost node 1")


@pytest.mark.timeout(60)
def test_a_failed_peer_is_named_with_its_reason():
    a, b = _join_all([{}, {}], free_port() - 1)
    b.report_failure("trainer rank 1 failed")
    assert a.lost_peer(force=True) == "node 1 failed: trainer rank 1 failed"


def test_under_torchrun_one_launcher_per_node_and_its_port_left_to_it():
    env = {
        "WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "RANK": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "n0",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "x",
    }
    p = resolve_placement(DistConfig(), env=env)
    assert (p.nodes, p.node_rank, p.master_addr, p.master_port) == (2, 1, "n0", 29501)
    with pytest.raises(UsageError, match="--nproc_per_node 1"):
        resolve_placement(DistConfig(), env={**env, "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16"})


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dist.timeout", "0"], "--dist.timeout must be > 0"),
        (["--dist.nodes", "0"], "--dist.nodes must be at least 1"),
        (["--dist.node_rank", "-1"], "dist.node_rank"),
    ],
)
def test_bad_dist_flags_are_refused_before_anything_starts(flags, message):
    from streamgen.config import parse_config

    with pytest.raises(UsageError, match=message):
        parse_config(flags)


def test_resume_with_another_node_count_is_refused(tmp_path, capsys):
    """A checkpoint of 2 nodes x 1 trainer cannot resume on 1 node x 1 trainer."""
    import torch

    from streamgen.launch.launcher import main
    from streamgen.plan.classes import load_classes
    from streamgen.train.stream_data import StreamDataModule

    state = {
        "format": "streamgen-stream/1",
        "classes": load_classes("imagenet100:10").fingerprint(),
        "class_spec": "imagenet100:10",
        "seed": 0,
        "unit_size": 8,
        "world": 2,
        "cursors": [{"rank": r, "world": 2, "below": 3, "done": []} for r in range(2)],
    }
    ckpt = tmp_path / "two-nodes.ckpt"
    torch.save({StreamDataModule.__qualname__: state}, ckpt)
    config = Path(__file__).resolve().parents[2] / "configs" / "smoke_tiny.yaml"
    code = main(["--config", str(config), "--out", str(tmp_path / "runs"), "--resume", str(ckpt)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "2 trainer ranks in all (nodes x --trainers), this run 1" in err
    assert not (tmp_path / "runs").exists()


def test_a_trainer_rank_sheds_the_outer_launchers_variables():
    from streamgen.launch.nodes import without_outer_launcher

    env = {"RANK": "1", "LOCAL_RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "True", "PATH": "/bin", "NODE_RANK": "1"}
    assert without_outer_launcher(env) == {"PATH": "/bin"}


# -- security: bound stores, authenticated launcher messages (issue 24) -----------------------


def listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


@pytest.mark.timeout(60)
def test_node_0_serves_both_stores_on_master_addr_only():
    port = free_port() - 1
    a, b = _join_all([{}, {}], port)
    assert isinstance(a, NodeGroup) and isinstance(b, NodeGroup)
    assert listening(port + 1) == ["0100007F"]  # the launchers' store: 127.0.0.1, not 0.0.0.0 or ::
    assert listening(port) == ["0100007F"]  # the trainers' DDP store, served by node 0's launcher


@pytest.mark.timeout(60)
def test_a_foreign_store_client_without_the_secret_is_ignored_and_the_run_goes_on(capsys):
    """A plain TCPStore client (no secret) sets the failure key, a fake beat and a run folder:
    node 0 ignores all of it (said once, escaped) and the nodes keep their own view."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    port = free_port() - 1
    a, b = _join_all([{}, {}], port)
    foreign = TCPStore("127.0.0.1", port + 1, is_master=False, timeout=timedelta(seconds=5))
    foreign.set("failed/1", "stop now \x1b[2J\x1b]0;pwned\x07")
    foreign.set("done/1", "1")
    foreign.set("shared/run_dir", "/tmp/elsewhere")
    assert a.lost_peer(force=True) is None  # not stopped by the forged failure
    b.report_failure("trainer rank 1 failed")  # ... but an authentic one still counts
    assert a.lost_peer(force=True) == "node 1 failed: trainer rank 1 failed"
    err = capsys.readouterr().err
    assert "fails authentication" in err and "\x1b" not in err and "\\x1b[2J" in err
    with pytest.raises(UsageError, match="did not publish run_dir"):  # the forged folder is never taken
        b.timeout = 1
        b.share("run_dir")


@pytest.mark.timeout(60)
def test_nodes_with_different_secrets_are_refused_naming_the_secret():
    port = free_port() - 1
    results: list = [None, None]

    def node(rank: int, secret: bytes) -> None:
        group = NodeGroup(Placement(2, rank, "127.0.0.1", port, "flags"), 3, secret)
        try:
            group.join({})
            results[rank] = group
        except UsageError as e:
            results[rank] = e

    threads = [threading.Thread(target=node, args=(r, s)) for r, s in ((0, b"one"), (1, b"two"))]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join(30)
    assert all(isinstance(r, UsageError) for r in results)
    assert "fail authentication: start every node with the same STREAMGEN_DIST_SECRET" in str(results[1])


def test_a_run_on_several_nodes_without_a_secret_is_refused(tmp_path, capsys, monkeypatch):
    from streamgen.launch.launcher import main

    monkeypatch.delenv("STREAMGEN_DIST_SECRET", raising=False)
    config = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
    flags = ["--dist.nodes", "2", "--dist.node_rank", "0", "--dist.master_addr", "127.0.0.1"]
    code = main(["--config", str(config), "--model", "fake", "--out", str(tmp_path / "runs"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "needs a secret its launchers share" in err
    assert not (tmp_path / "runs").exists()


def test_the_secret_comes_from_the_environment_or_a_file_under_out(tmp_path):
    from streamgen.launch.nodes import dist_secret

    assert dist_secret(str(tmp_path), {"STREAMGEN_DIST_SECRET": "abc"}) == b"abc"
    (tmp_path / ".streamgen-secret").write_text("from-a-file\n")
    assert dist_secret(str(tmp_path), {}) == b"from-a-file"


@pytest.mark.timeout(60)
def test_the_ddp_port_taken_is_refused_before_anything_is_made():
    port = free_port() - 1
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        group = NodeGroup(Placement(2, 0, "127.0.0.1", port, "flags"), 2, SECRET)
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port} for the trainers' DDP group"):
            group.join({})
