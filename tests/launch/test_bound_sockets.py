"""Issue 24: a running single-node DDP run (2 trainer ranks) listens on loopback only."""

import os
from pathlib import Path

import pytest

LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net/tcp{,6} write them


def listening_sockets() -> dict[str, str]:
    """Socket inode -> local address (hex) of every listening TCP socket of this machine."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                found[fields[9]] = fields[1].rsplit(":", 1)[0]
    return found


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass  # the process ended meanwhile
    return inodes


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_two_trainer_run_listens_on_loopback_only(train_run):
    run = train_run("--model", "fake", "--generators", "1", "--trainers", "2", "--train.max_steps", "100000")
    run.wait_for(" step=", 300)  # the DDP group is formed and training
    table = listening_sockets()
    ours = {inode: table[inode] for pid in run.processes() for inode in socket_inodes(pid) if inode in table}
    assert ours, "the run listens on no socket: the DDP store should be there"
    assert set(ours.values()) <= LOOPBACK, ours
