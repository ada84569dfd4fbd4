"""The userspace owner look-up, on a fake /proc tree (sources/owners.py)."""

from __future__ import annotations

import os
from pathlib import Path

from egress_monitor.builds import BuildRegistry
from egress_monitor.enforce.cgroups import Cgroups
from egress_monitor.events import ExecInfo, FlowKey, Protocol
from egress_monitor.process_tree import Node
from egress_monitor.sources.owners import Owners
from egress_monitor.sources.procfs import ProcFS


class Finder:
    def __init__(self, inodes: set[int]) -> None:
        self.found = inodes

    def inodes(self, flow: FlowKey) -> set[int]:
        return self.found


def proc_with_sockets(root: Path, sockets: dict[int, list[int]]) -> ProcFS:
    for pid, inodes in sockets.items():
        fd = root / str(pid) / "fd"
        fd.mkdir(parents=True)
        for n, inode in enumerate(inodes):
            os.symlink(f"socket:[{inode}]", fd / str(n))
        os.symlink("/dev/null", fd / "99")
    return ProcFS(str(root))


def test_the_newest_live_member_holding_the_socket_is_the_owner(tmp_path: Path) -> None:
    procfs = proc_with_sockets(tmp_path / "proc", {10: [500], 11: [500], 12: [700]})
    root = Node(pid=10, parent=None, info=ExecInfo(exe="/usr/bin/cargo"), started_ns=1)
    build = BuildRegistry(31000, 2).start(root, ts_ns=0, wall=0.0, via="cargo")
    child = Node(pid=11, parent=root, started_ns=2)
    gone = Node(pid=12, parent=root, started_ns=3, exited_ns=4)
    build.members |= {root, child, gone}
    flow = FlowKey(4, Protocol.TCP, 6, "198.51.100.1", 40000, "198.51.100.2", 80)
    owners = Owners(procfs, Finder({500}), Cgroups(str(tmp_path / "cg")),  # type: ignore[arg-type]
                    lambda pid: None)
    assert owners.of_flow(flow, build) is child  # inherited: the child is more specific
    none = Owners(procfs, Finder({700}), Cgroups(str(tmp_path / "cg")),  # type: ignore[arg-type]
                  lambda pid: None)
    assert none.of_flow(flow, build) is None  # only an exited process held it
    empty = Owners(procfs, Finder(set()), Cgroups(str(tmp_path / "cg")),  # type: ignore[arg-type]
                   lambda pid: None)
    assert empty.of_flow(flow, build) is None
