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

Security. Node 0 serves both stores (the launchers' and the trainers' DDP store, which it hosts
itself so that it can bind it) on the address ``master_addr`` names on node 0 only, never on
every interface; a single-node run serves its DDP store on 127.0.0.1 (and pins gloo/NCCL to
``lo``). Every launcher message is authenticated: an HMAC-SHA256 under a key derived from a
secret every node shares and the run (node 0's random nonce and the config fingerprint). The
secret is ``STREAMGEN_DIST_SECRET`` from the environment, else the file ``--out/.streamgen-secret``
(a shared disk); a run on several nodes without one is refused. With SLURM:
``export STREAMGEN_DIST_SECRET=$(openssl rand -hex 32)`` before ``srun`` (srun passes the
environment on); with torchrun: the same variable on every node's command line. A message that
fails the check is ignored (said once, escaped); a peer's text is always printed escaped.
What this does not cover: the trainers' DDP store itself speaks torch's unauthenticated
protocol (bound to node 0's cluster address, it is open to that network), and gloo/NCCL bind
where torch puts them on a multi-node run (set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
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


SECRET_ENV = "STREAMGEN_DIST_SECRET"
SECRET_FILE = ".streamgen-secret"


def dist_secret(out: str, env: dict[str, str] | None = None) -> bytes:
    """The secret the nodes of a run share: ``STREAMGEN_DIST_SECRET``, else ``--out/.streamgen-secret``."""
    env = os.environ if env is None else env
    if env.get(SECRET_ENV):
        return env[SECRET_ENV].encode()
    path = Path(out) / SECRET_FILE
    try:
        text = path.read_bytes().strip()
    except FileNotFoundError:
        text = b""
    except OSError as e:
        raise UsageError(f"cannot read the run secret {path}: {e.strerror}") from None
    if text:
        return text
    raise UsageError(
        f"a run on several nodes needs a secret its launchers share: export {SECRET_ENV}=$(openssl rand -hex 32) "
        f"on every node (srun passes it on), or write one to {path} on a disk every node reads"
    )


def printable(text: str, limit: int = 500) -> str:
    """A peer's text as it may be printed: control characters (terminal escapes) escaped."""
    text = text[:limit]
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``'s address only (not every interface); UsageError-free:
    raises OSError (address not on this machine, port taken) for the caller to word."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 to /dev/null for the block (C++ libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def serve_store(host: str, port: int, timeout: float):
    """A TCPStore server listening on ``host``'s address alone (port 0: any free one), through a
    socket bound here (torch's own would listen on every interface); the store owns the socket."""
    from torch.distributed import TCPStore

    sock = bound_socket(host, port)
    bound = sock.getsockname()[1]
    return TCPStore(
        host, bound, None, True, timedelta(seconds=timeout), wait_for_workers=False, master_listen_fd=sock.detach()
    )


def ddp_client_env(addr: str, port: int, loopback: bool) -> dict[str, str]:
    """What makes every trainer rank a client of the DDP store the launcher serves at ``addr:port``
    (torch's env:// rendezvous honours TORCHELASTIC_USE_AGENT_STORE for exactly that address)."""
    env = {"MASTER_ADDR": addr, "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    if loopback:  # one machine: gloo's and NCCL's own sockets on loopback too
        env.update(
            GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
            NCCL_SOCKET_IFNAME=os.environ.get("NCCL_SOCKET_IFNAME", "lo"),
        )
    return env


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

    def __init__(self, placement: Placement, timeout: float, secret: bytes) -> None:
        self.placement, self.timeout = placement, timeout
        self.store = None
        self.ddp_store = None  # node 0: the trainers' DDP store, served by this launcher
        self._beats: dict[int, tuple[int, float]] = {}
        self._last_check = 0.0
        self._stop_beating = threading.Event()
        self._config_key = hmac.new(secret, b"streamgen-config/1", hashlib.sha256).digest()
        self._secret = secret
        self._key = self._config_key  # the run's key once the configs are checked
        self._forged: set[str] = set()

    @property
    def node_rank(self) -> int:
        return self.placement.node_rank

    @property
    def peers(self) -> list[int]:
        return [n for n in range(self.placement.nodes) if n != self.node_rank]

    # -- signed messages ------------------------------------------------------------------

    def _sign(self, name: str, payload: str, key: bytes | None = None) -> str:
        mac = hmac.new(key or self._key, f"{name}\n{payload}".encode(), hashlib.sha256).hexdigest()
        return json.dumps({"v": payload, "mac": mac})

    def _put(self, name: str, payload: str, store=None, key: bytes | None = None) -> None:
        (store or self.store).set(name, self._sign(name, payload, key))

    def _open(self, name: str, raw: bytes, key: bytes | None = None, quiet: bool = False) -> str | None:
        """The payload of a message, or None (said once, escaped, unless ``quiet``) if it fails the check."""
        try:
            message = json.loads(raw)
            payload, mac = message["v"], message["mac"]
            want = hmac.new(key or self._key, f"{name}\n{payload}".encode(), hashlib.sha256).hexdigest()
            if isinstance(payload, str) and isinstance(mac, str) and hmac.compare_digest(mac, want):
                return payload
        except (ValueError, TypeError, KeyError):
            pass
        if name not in self._forged and not quiet:
            self._forged.add(name)
            text = printable(raw.decode("utf-8", "replace"), 80)
            _log(f"ignored a message under {name!r} that fails authentication (not from a node of this run): {text}")
        return None

    def _read(self, name: str, key: bytes | None = None) -> str | None:
        """The key's authentic payload, or None (absent or failing the check)."""
        if not self.store.check([name]):
            return None
        return self._open(name, self.store.get(name), key)

    # -- joining ---------------------------------------------------------------------------

    def join(self, config: dict[str, Any]) -> None:
        """Connect, publish this node's config and check every other node's against it."""
        from torch.distributed import TCPStore

        p = self.placement
        where = f"{p.master_addr}:{p.store_port}"
        try:
            if p.node_rank == 0:
                self.store = serve_store(p.master_addr, p.store_port, self.timeout)
            else:
                with quiet_stderr():  # c10d prints a C++ warning per failed attempt; the one line below says it
                    self.store = TCPStore(p.master_addr, p.store_port, p.nodes, False, timedelta(seconds=self.timeout))
        except Exception as e:  # OSError, DistNetworkError, RuntimeError: unreachable, port taken, not our address
            if p.node_rank == 0:
                why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
                raise UsageError(
                    f"node 0 cannot listen on {where} ({why}): --dist.master_addr must name this node and "
                    "--dist.master_port (and the next port) be free"
                ) from None
            raise UsageError(
                f"node {p.node_rank} cannot reach node 0 at {where} within {self.timeout:.0f} s: "
                "check --dist.master_addr/--dist.master_port and that node 0 has started"
            ) from None
        if p.node_rank == 0:
            try:  # the trainers' DDP store: bound here, before any folder is made
                self.ddp_store = serve_store(p.master_addr, p.master_port, self.timeout)
            except OSError as e:
                raise UsageError(
                    f"node 0 cannot listen on {p.master_addr}:{p.master_port} for the trainers' DDP group "
                    f"({e.strerror}): pick another --dist.master_port"
                ) from None
        mine = config_fingerprint(config)
        nonce = secrets.token_hex(16) if p.node_rank == 0 else None
        payload = json.dumps({"config": mine, "nonce": nonce})
        self._put(f"config/{self.node_rank}", payload, key=self._config_key)
        for peer in self.peers:
            theirs = json.loads(self._wait_authentic(f"config/{peer}", f"node {peer} did not join"))
            nonce = theirs["nonce"] if peer == 0 else nonce
            key = first_difference(mine, theirs["config"])
            if key is not None:
                self.store.set(f"checked/{self.node_rank}", "1")
                self._linger(peer)
                raise UsageError(
                    f"node {peer} runs another config: {key} is {printable(repr(_lookup(theirs['config'], key)))} "
                    f"there and {_lookup(mine, key)!r} here; start every node with the same config"
                )
        self.store.set(f"checked/{self.node_rank}", "1")
        fingerprint = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()
        self._key = hmac.new(self._secret, f"run/{nonce}/{fingerprint}".encode(), hashlib.sha256).digest()
        # Beat from a thread with its own connection: the launcher may be busy for minutes
        # (spawning, building a cache) and is alive all the same.
        threading.Thread(target=self._beat_forever, name="streamgen-node-heartbeat", daemon=True).start()

    def _linger(self, peer: int) -> None:
        """Node 0 refusing a peer keeps its store up until that peer has read why (bounded):
        the peer then says the true reason, not that node 0 did not join."""
        if self.node_rank != 0:
            return
        deadline = time.monotonic() + min(self.timeout, 10.0)
        while time.monotonic() < deadline and not self.store.check([f"checked/{peer}"]):
            time.sleep(0.1)

    def _wait_authentic(self, name: str, what: str) -> str:
        """The first authentic value of ``name`` (a forged one is ignored: the real node overwrites it)."""
        deadline = time.monotonic() + self.timeout
        forged = False
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                self.store.wait([name], timedelta(seconds=left))
                raw = self.store.get(name)
            except Exception:
                hint = (
                    f"; its messages fail authentication: start every node with the same {SECRET_ENV} "
                    f"(or --out/{SECRET_FILE})"
                    if forged
                    else "; is train.py running there with the same --dist flags?"
                )
                raise UsageError(f"{what} within {self.timeout:.0f} s{hint}") from None
            payload = self._open(name, raw, key=self._config_key, quiet=True)  # the error below says it
            if payload is not None:
                return payload
            forged = True
            while time.monotonic() < deadline and self.store.get(name) == raw:
                time.sleep(0.2)

    def _connect(self):
        from torch.distributed import TCPStore

        p = self.placement
        return TCPStore(p.master_addr, p.store_port, is_master=False, timeout=timedelta(seconds=self.timeout))

    def _get(self, key: str, what: str) -> str:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                self.store.wait([key], timedelta(seconds=max(0.1, deadline - time.monotonic())))
            except Exception:
                break
            payload = self._read(key)
            if payload is not None:
                return payload
            time.sleep(0.2)  # a forged value: the real one overwrites it
        raise UsageError(f"{what} within {self.timeout:.0f} s; is train.py running there with the same --dist flags?")

    def share(self, key: str, value: str | None = None) -> str:
        """Node 0 publishes ``value`` under ``key``; every node returns node 0's (authentic) value."""
        if self.node_rank == 0:
            self._put(f"shared/{key}", value or "")
        return self._get(f"shared/{key}", f"node 0 did not publish {key}")

    def _beat_forever(self, period: float = 1.0) -> None:
        try:
            store = self._connect()
            count = 0
            while not self._stop_beating.wait(period if count else 0.0):
                count += 1
                self._put(f"beat/{self.node_rank}", str(count), store=store)
        except Exception:
            pass  # node 0 is gone: this node's own check names it

    def report_failure(self, reason: str) -> None:
        try:
            self._put(f"failed/{self.node_rank}", reason[:500])
        except Exception:
            pass  # node 0 is gone: the others notice that by themselves

    def finish(self) -> None:
        """This node is done; node 0 waits (bounded) until the others are too, so its store outlives them."""
        try:
            self._put(f"done/{self.node_rank}", "1")
            if self.node_rank == 0:
                deadline = time.monotonic() + self.timeout
                while time.monotonic() < deadline and not all(self._has(f"done/{n}") for n in self.peers):
                    if self.lost_peer(force=True):
                        break
                    time.sleep(0.5)
        except Exception:
            pass

    def _has(self, key: str) -> bool:
        return self._read(key) is not None

    def lost_peer(self, force: bool = False, stale_after: float | None = None) -> str | None:
        """One line naming a node that failed or stopped beating for ``stale_after`` seconds
        (default ``dist.timeout``), or None; checked at most every 2 s unless ``force``.
        Only authentic messages count: a forged failure or beat is ignored."""
        now = time.monotonic()
        stale_after = self.timeout if stale_after is None else stale_after
        if not force and now - self._last_check < 2.0:
            return None
        self._last_check = now
        try:
            for peer in self.peers:
                if self._has(f"done/{peer}"):
                    continue
                failed = self._read(f"failed/{peer}")
                if failed is not None:
                    return f"node {peer} failed: {printable(failed)}"
                beat = self._read(f"beat/{peer}")
                if beat is None and self.store.check([f"beat/{peer}"]):
                    continue  # overwritten by a foreign client: no verdict from it either way
                count = int(beat) if beat is not None and beat.isdigit() else 0
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


def _log(message: str) -> None:
    print(f"streamgen: {message}", file=sys.stderr, flush=True)
