"""The daemon's side of builds in other network namespaces (part of the composition root).

A build's process may run in a network namespace of its own (``unshare -n``, a container,
``ip netns exec``): there the host's rules do not apply, so each such namespace gets a gate
(``enforce/netns.py``: the build rules, the DNS and sinkhole redirects, a queue of its own),
opened at first use and closed when no build uses it (``netns_gates.py`` decides which).
A namespace is found at a member's exec (one stat), from the kernel's ``netns`` map (a
member made a socket there after a ``setns``, an ``unshare``, a clone: no exec to see it
by), and, after a restart, from the adopted builds' processes. docs/netns.md has the whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import struct
import time
from typing import TYPE_CHECKING

from egress_monitor.builds import Build
from egress_monitor.enforce.netns import SO_NETNS_COOKIE, NetnsGate
from egress_monitor.enforce.rules import BuildRule
from egress_monitor.netns_gates import NetnsGates
from egress_monitor.netns_record import Recorded, write_record
from egress_monitor.process_tree import Node
from egress_monitor.sources.procfs import ProcFS

if TYPE_CHECKING:
    from egress_monitor.daemon import Daemon

log = logging.getLogger(__name__)


class GateWiring:
    """Owned by the daemon (one thread); ``gates`` is None until :meth:`start`."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.gates: NetnsGates | None = None
        self.own_cookie = 0  # the daemon's own namespace, as the kernel's netns map names it
        self._open_ms = 0.0  # how long the last gate took to open (for the log)

    def start(self, stack: contextlib.ExitStack) -> None:
        """Gates for builds' processes in other network namespaces, opened at first use."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            self.own_cookie = struct.unpack(
                "=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
        self.gates = NetnsGates(os.stat("/proc/self/ns/net").st_ino, self._open,
                                proc_root=self.d.config.proc_root, on_close=self._closing)
        stack.callback(self.close)

    def close(self) -> None:
        """At stop: builds still running stay refused in every gated namespace too."""
        if self.gates is None:
            return
        running = [BuildRule(b.cgroup, b.queue) for b in self.d.registry.active()
                   if b.cgroup and self.d._populated(b.cgroup)]
        # Left refusing: recorded, so that `cleanup` can find them (netns_record.py)
        left = [Recorded(e.gate.inode, e.gate.cookie, e.pid)
                for e in self.gates.by_inode.values()] if running else []
        self.gates.close_all(running)
        try:
            write_record(left)
        except OSError as exc:
            log.error("cannot record the namespaces left refusing: %s", exc)

    def _open(self, path: str) -> NetnsGate:
        d = self.d
        started = time.monotonic_ns()
        nsg = NetnsGate.open(path, d._rules(), dns_port=d.config.dns_port,
                             sink_port=d.config.sink_port, dns=d._dns_server,
                             sinkhole=d._sinkhole, mark_gate=d.firewall.mark_gate)
        if d._sel is not None and nsg.queue is not None:
            d._sel.register(nsg.queue.fileno(), selectors.EVENT_READ, ("gate", nsg.inode))
        d.metrics.proc_events.labels("netns_gate").inc()
        self._open_ms = (time.monotonic_ns() - started) / 1e6
        return nsg

    def _closing(self, nsg: NetnsGate) -> None:
        if self.d._sel is not None and nsg.queue is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.d._sel.unregister(nsg.queue.fileno())
        if self.d.bpf is not None:
            self.d.bpf.forget_netns(nsg.cookie)  # a later member socket there reports it again

    def at_exec(self, pid: int, exec_ns: int) -> None:
        """At a member's exec: gate its namespace if it is not ours (one stat)."""
        node = self.d.tree.get(pid)
        if self.gates is None or node is None or node.build is None:
            return
        known = len(self.gates.by_inode)
        nsg = self.gates.use(pid, node.build.id)
        if nsg is not None and len(self.gates.by_inode) > known:
            # How long the exec'd program ran before its namespace had a gate (the backstop
            # held its packets meanwhile): the proc connector's stamp is CLOCK_MONOTONIC.
            log.info("network namespace %d gated %.1f ms after pid %d's exec (open %.1f ms)",
                     nsg.inode, (time.monotonic_ns() - exec_ns) / 1e6, pid, self._open_ms)

    def adopted(self, adopted: list[tuple[str, list[int]]]) -> None:
        """After a restart: re-gate every namespace an adopted build's processes are in,
        before the loop runs (the previous daemon left only refusing rules there, and a
        member that never execs or makes a socket again would not be seen otherwise)."""
        if self.gates is None:
            return
        for build_id, pids in adopted:
            for pid in pids:
                self.gates.use(pid, build_id)
        self.sync()

    def seen_netns(self) -> None:
        """Namespaces the kernel saw members make sockets in (after a setns, an unshare, a
        clone into a new namespace: no exec to see it by)."""
        bpf = self.d.bpf
        if bpf is None or self.gates is None:
            return
        known = self.gates.cookies() | {self.own_cookie}
        for cookie, tgid in bpf.netns_seen().items():
            if cookie in known:
                continue
            node = self.d.tree.get(tgid)
            nsg = None
            if node is not None and node.build is not None and node.build.ended_ns is None:
                nsg = self.gates.use(tgid, node.build.id)
            if nsg is None or nsg.cookie != cookie:
                # Gone, or moved on: the next member socket made there reports it again.
                bpf.forget_netns(cookie)

    def drain_all(self) -> int:
        """Judge what every gate's queue holds now; how many packets that was."""
        return sum(self.d._drain_queue(entry.gate) for entry in (
            list(self.gates.by_inode.values()) if self.gates else ()))

    def drain(self, inode: int) -> None:
        entry = self.gates.by_inode.get(inode) if self.gates else None
        if entry is not None:
            self.d._drain_queue(entry.gate)

    def sync(self) -> None:
        """Every gate's build rules set to the host's (after any change of builds)."""
        if self.gates is not None:
            for error in self.gates.sync(self.d._rules()):
                log.error("cannot install build rules in a namespace: %s", error)

    def release(self, build: Build) -> None:
        if self.gates is not None:
            self.gates.release(build.id)

    def dns_owner(self, client: tuple[str, int], transport: str
                  ) -> tuple[Node | None, Build | None]:
        """A query that came in through a namespace's gate: its client socket is listed in
        that namespace's tables (``/proc/PID/net``), not the host's."""
        if self.gates is None:
            return None, None
        proto = "udp" if transport == "udp" else "tcp"
        for pid in self.gates.pids():
            tables = ProcFS(f"{self.d.config.proc_root}/{pid}")
            inodes = tables.net_inodes(proto, client[1]) | tables.net_inodes(proto + "6",
                                                                             client[1])
            for build in self.d.registry.active() if inodes else ():
                owner = self.d.owners.of_inodes(inodes, build)
                if owner is not None:
                    return owner, build
        return None, None
