"""Many nodes, one run: where this node stands, and the launchers' handshake and heartbeat.

Every node runs one launcher (``train.py`` with the same config) with its own generators and
trainer ranks. The trainer ranks of all nodes form one DDP group: global rank =
``node_rank * trainers + local rank``, and the plan gives global rank r the units
``r, r + W, r + 2W, ...`` (W = nodes x trainers), so no sample id is made on two nodes.

- `resolve_placement` reads the node count, this node's rank and node 0's address from the
  ``--dist.*`` flags, else SLURM (``SLURM_NNODES``, ``SLURM_NODEID``, ``SLURM_JOB_NODELIST``),
  else torchrun-style variables (``WORLD_SIZE``, ``NODE_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``, one launcher per node), else a single node.
- `NodeGroup` connects the launchers through a `torch.distributed.TCPStore` served by node 0
  on ``master_port + 1`` (the trainers' DDP group uses ``master_port``). At start every node
  publishes its config; a node whose config differs is refused with one line naming the first
  key that differs. Then each launcher beats once a second; a node that stops beating for
  ``dist.timeout`` seconds, or that reports a failure, stops the others with one line naming it.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from streamgen.errors import UsageError

DEFAULT_PORT = 29500
# Variables of an outer launcher (torchrun, SLURM's srun) that would make Lightning in a trainer
# believe it was started by them: the launcher sets its own for each trainer rank.
OUTER_LAUNCHER_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
OUTER_LAUNCHER_PREFIXES = ("TORCHELASTIC_",)  # e.g. TORCHELASTIC_USE_AGENT_STORE: torchrun's own store


def without_outer_launcher(env: dict[str, str]) -> dict[str, str]:
    """``env`` less what torchrun or srun set for the launcher (a trainer rank gets its own)."""
    return {k: v for k, v in env.items() if k not in OUTER_LAUNCHER_ENV and not k.startswith(OUTER_LAUNCHER_PREFIXES)}


@dataclass(frozen=True)
class Placement:
    """This node's place in the run."""

    nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # where the placement came from: flags, slurm, torchrun or single

    @property
    def store_port(self) -> int:
        return self.master_port + 1


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UsageError(f"SLURM_JOB_NODELIST {nodelist!r} is not a node list; set --dist.master_addr")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _int_env(env: dict[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_placement(dist, env: dict[str, str] | None = None) -> Placement:
    """Flags first, then SLURM, then torchrun-style variables, then a single node."""
    env = dict(os.environ if env is None else env)
    in_slurm = "SLURM_NNODES" in env and "SLURM_NODEID" in env
    if dist.nodes is not None:
        source = "flags"
    elif in_slurm:
        source = "slurm"
    elif "WORLD_SIZE" in env and ("NODE_RANK" in env or "GROUP_RANK" in env):
        source = "torchrun"
    else:
        source = "single"
    nodes = dist.nodes
    if nodes is None:
        nodes = {"slurm": _int_env(env, "SLURM_NNODES"), "torchrun": _int_env(env, "WORLD_SIZE")}.get(source, 1)
    node_rank = dist.node_rank
    if node_rank is None and in_slurm:
        node_rank = _int_env(env, "SLURM_NODEID")
    if node_rank is None:
        node_rank = _int_env(env, "NODE_RANK")
    if node_rank is None:
        node_rank = _int_env(env, "GROUP_RANK")  # torchrun's name for it
    if node_rank is None:
        node_rank = 0
    master_addr = dist.master_addr or env.get("MASTER_ADDR")
    if master_addr is None and in_slurm and env.get("SLURM_JOB_NODELIST"):
        master_addr = slurm_first_host(env["SLURM_JOB_NODELIST"])
    master_port = dist.master_port or _int_env(env, "MASTER_PORT") or DEFAULT_PORT
    under_torchrun = "TORCHELASTIC_RUN_ID" in env
    if under_torchrun:
        if (_int_env(env, "LOCAL_WORLD_SIZE") or 1) != 1:
            raise UsageError(
                "torchrun: start one launcher per node (--nproc_per_node 1); train.py starts its own processes"
            )
        if dist.master_port is None:
            master_port += 1  # torchrun's own store listens on MASTER_PORT
    if nodes < 1:
        raise UsageError(f"the run needs at least 1 node (got {nodes} from {source})")
    if not 0 <= node_rank < nodes:
        raise UsageError(f"node rank {node_rank} is out of range for {nodes} node(s): use 0..{nodes - 1}")
    if nodes > 1 and not master_addr:
        raise UsageError("a run on several nodes needs node 0's address: --dist.master_addr HOST (or MASTER_ADDR)")
    if not 0 < master_port < 65535:
        raise UsageError(f"--dist.master_port {master_port} is not a usable port (1..65534)")
    return Placement(nodes, node_rank, master_addr or "127.0.0.1", master_port, source)


def config_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The config every node must share: everything but what names this node."""
    shared = json.loads(json.dumps(config, default=str))
    shared.get("dist", {}).pop("node_rank", None)
    return shared


def first_difference(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str | None:
    """The first dotted key whose value differs between two nested dicts, or None."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = first_difference(x, y, f"{prefix}{key}.")
            if found:
                return found
        elif x != y:
            return f"{prefix}{key}"
    return None


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


class NodeGroup:
    """The launchers of one run, joined through a TCPStore on node 0 (see the module docstring)."""

    def __init__(self, placement: Placement, timeout: float) -> None:
        self.placement, self.timeout = placement, timeout
        self.store = None
        self._beats: dict[int, tuple[int, float]] = {}
        self._last_check = 0.0
        self._stop_beating = threading.Event()

    @property
    def node_rank(self) -> int:
        return self.placement.node_rank

    @property
    def peers(self) -> list[int]:
        return [n for n in range(self.placement.nodes) if n != self.node_rank]

    def join(self, config: dict[str, Any]) -> None:
        """Connect, publish this node's config and check every other node's against it."""
        from torch.distributed import TCPStore

        p = self.placement
        try:
            self.store = TCPStore(
                p.master_addr,
                p.store_port,
                world_size=p.nodes,
                is_master=p.node_rank == 0,
                timeout=timedelta(seconds=self.timeout),
                wait_for_workers=False,
            )
        except Exception as e:  # DistNetworkError, RuntimeError: unreachable or port taken
            where = f"{p.master_addr}:{p.store_port}"
            if p.node_rank == 0:
                raise UsageError(
                    f"node 0 cannot listen on {where} ({type(e).__name__}): pick another --dist.master_port"
                ) from None
            raise UsageError(
                f"node {p.node_rank} cannot reach node 0 at {where} within {self.timeout:.0f} s: "
                "check --dist.master_addr/--dist.master_port and that node 0 has started"
            ) from None
        mine = config_fingerprint(config)
        self.store.set(f"config/{self.node_rank}", json.dumps(mine))
        for peer in self.peers:
            theirs = json.loads(self._get(f"config/{peer}", f"node {peer} did not join"))
            key = first_difference(mine, theirs)
            if key is not None:
                self.store.set(f"failed/{self.node_rank}", "its config differs")
                raise UsageError(
                    f"node {peer} runs another config: {key} is {_lookup(theirs, key)!r} there and "
                    f"{_lookup(mine, key)!r} here; start every node with the same config"
                )
        # Beat from a thread with its own connection: the launcher may be busy for minutes
        # (spawning, building a cache) and is alive all the same.
        threading.Thread(target=self._beat_forever, name="streamgen-node-heartbeat", daemon=True).start()

    def _connect(self):
        from torch.distributed import TCPStore

        p = self.placement
        return TCPStore(p.master_addr, p.store_port, is_master=False, timeout=timedelta(seconds=self.timeout))

    def _get(self, key: str, what: str) -> bytes:
        try:
            self.store.wait([key], timedelta(seconds=self.timeout))
            return self.store.get(key)
        except Exception:
            raise UsageError(
                f"{what} within {self.timeout:.0f} s; is train.py running there with the same --dist flags?"
            ) from None

    def share(self, key: str, value: str | None = None) -> str:
        """Node 0 publishes ``value`` under ``key``; every node returns node 0's value."""
        if self.node_rank == 0:
            self.store.set(f"shared/{key}", value or "")
        return self._get(f"shared/{key}", f"node 0 did not publish {key}").decode()

    def _beat_forever(self, period: float = 1.0) -> None:
        try:
            store = self._connect()
            count = 0
            while not self._stop_beating.wait(period if count else 0.0):
                count += 1
                store.set(f"beat/{self.node_rank}", str(count))
        except Exception:
            pass  # node 0 is gone: this node's own check names it

    def report_failure(self, reason: str) -> None:
        try:
            self.store.set(f"failed/{self.node_rank}", reason[:500])
        except Exception:
            pass  # node 0 is gone: the others notice that by themselves

    def finish(self) -> None:
        """This node is done; node 0 waits (bounded) until the others are too, so its store outlives them."""
        try:
            self.store.set(f"done/{self.node_rank}", "1")
            if self.node_rank == 0:
                deadline = time.monotonic() + self.timeout
                while time.monotonic() < deadline and not all(self._has(f"done/{n}") for n in self.peers):
                    if self.lost_peer(force=True):
                        break
                    time.sleep(0.5)
        except Exception:
            pass

    def _has(self, key: str) -> bool:
        return self.store.check([key])

    def lost_peer(self, force: bool = False, stale_after: float | None = None) -> str | None:
        """One line naming a node that failed or stopped beating for ``stale_after`` seconds
        (default ``dist.timeout``), or None; checked at most every 2 s unless ``force``."""
        now = time.monotonic()
        stale_after = self.timeout if stale_after is None else stale_after
        if not force and now - self._last_check < 2.0:
            return None
        self._last_check = now
        try:
            for peer in self.peers:
                if self._has(f"done/{peer}"):
                    continue
                if self._has(f"failed/{peer}"):
                    return f"node {peer} failed: {self.store.get(f'failed/{peer}').decode()}"
                count = int(self.store.get(f"beat/{peer}")) if self._has(f"beat/{peer}") else 0
                seen, since = self._beats.get(peer, (-1, now))
                if count != seen:
                    self._beats[peer] = (count, now)
                elif now - since > stale_after:
                    return f"lost node {peer}: no heartbeat for {now - since:.0f} s"
        except Exception:
            return "lost node 0: its launcher is unreachable"
        return None

    def name_the_lost_peer(self, within: float = 10.0) -> str | None:
        """After a broken collective: which node went? Launchers beat every second, so a few
        seconds of silence right after the break names it (None if every node still beats)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            lost = self.lost_peer(force=True, stale_after=min(5.0, self.timeout))
            if lost is not None:
                return lost
            time.sleep(0.5)
        return None

    def close(self) -> None:
        self._stop_beating.set()
        self.store = None
