"""Which build process holds a socket: the userspace owner look-up (until the kernel's creator
stamps replace it, docs/bpf.md).

Only the build's own processes are read (their ``/proc/PID/fd`` links), newest first, then any
process in the build's cgroup the tree missed; the socket's inodes come from sock_diag (a
flow's exact 4-tuple) or ``/proc/net`` (a DNS client's local port, a loopback listener).
Everything here reads ``/proc`` and netlink; nothing here decides anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from egress_monitor.builds import Build
from egress_monitor.enforce.cgroups import Cgroups
from egress_monitor.events import FlowKey
from egress_monitor.loopback import reached
from egress_monitor.process_tree import Node
from egress_monitor.sources.procfs import ProcFS
from egress_monitor.sources.sockdiag import SocketFinder


class Owners:
    """Owner look-ups against the live tree (``node_of``) and the builds' cgroups."""

    def __init__(self, procfs: ProcFS, finder: SocketFinder, cgroups: Cgroups,
                 node_of: Callable[[int], Node | None]) -> None:
        self._procfs = procfs
        self._finder = finder
        self._cgroups = cgroups
        self._node_of = node_of

    def of_flow(self, flow: FlowKey, build: Build) -> Node | None:
        """The build process holding the flow's socket, or None (it closed, or exited)."""
        inodes = self._finder.inodes(flow)
        return self.of_inodes(inodes, build) if inodes else None

    def of_dns_client(self, client: tuple[str, int], transport: str,
                      builds: Iterable[Build]) -> tuple[Node | None, Build | None]:
        """The build process whose socket sent a (redirected) DNS query, and its build.

        The client socket is still open, waiting for the answer: it is found by its local
        port among the host's sockets, then among the live builds' own processes.
        """
        port = client[1]
        proto = "udp" if transport == "udp" else "tcp"
        inodes = self._procfs.net_inodes(proto, port) | \
            self._procfs.net_inodes(proto + "6", port)
        if not inodes:
            return None, None
        for build in builds:
            owner = self.of_inodes(inodes, build)
            if owner is not None:
                return owner, build
        return None, None

    def listener_in_build(self, protocol: str, dst: str, dst_port: int, build: Build) -> bool:
        """Whether every socket that may receive a loopback flow listens in a process of the
        flow's own build (loopback.py)."""
        inodes = reached(self._procfs.net_table(protocol) +
                         self._procfs.net_table(protocol + "6"), protocol, dst, dst_port)
        if not inodes:
            return False
        held: set[int] = set()
        for node in build.members:
            if node.exited_ns is None:
                held |= self._procfs.socket_inodes(node.pid)
        if build.cgroup and not inodes <= held:  # processes the tree missed
            for pid in self._cgroups.procs(build.cgroup):
                held |= self._procfs.socket_inodes(pid)
        return inodes <= held

    def of_inodes(self, inodes: set[int], build: Build) -> Node | None:
        """The newest live member holding one of the sockets (a child that inherited the
        socket is the more specific answer), else a process of the build's cgroup."""
        for node in sorted(build.members, key=lambda n: n.started_ns, reverse=True):
            if node.exited_ns is None and self._procfs.socket_inodes(node.pid) & inodes:
                return node
        if build.cgroup:  # a process the tree missed is still in the cgroup
            known = {n.pid for n in build.members}
            for pid in self._cgroups.procs(build.cgroup):
                if pid not in known and self._procfs.socket_inodes(pid) & inodes:
                    return self._node_of(pid)
        return None
