"""The daemon's gates in other network namespaces: one per namespace, kept while a build uses it.

A build uses a namespace once one of its processes is seen there: at its exec (its
``/proc/PID/ns/net`` is not the daemon's) or when the kernel reports a member's socket in a
namespace (``BpfOwner.netns_seen``). The first use opens the namespace's gate (through the
process's ``/proc/PID/ns/net``: the namespace needs no name); the gate closes when the last
build using it ends. Namespaces are told apart by inode (what events name them by) and by
cookie (what the kernel reports: never reused).

The opener and the namespace look-ups are injected, so this bookkeeping is tested without a
kernel; the daemon passes ``NetnsGate.open`` and ``/proc``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from egress_monitor.enforce.netns import NetnsGate
from egress_monitor.enforce.rules import BuildRule

log = logging.getLogger(__name__)
Opener = Callable[[str], NetnsGate]


@dataclass
class _Entry:
    gate: NetnsGate
    users: set[str] = field(default_factory=set)  # build ids
    pid: int = 0  # the last process seen there (its /proc/PID/net shows the namespace)


def ns_inode(pid: int, proc_root: str = "/proc") -> int | None:
    """The inode of a process's network namespace, None when it is gone."""
    try:
        return os.stat(f"{proc_root}/{pid}/ns/net").st_ino
    except OSError:
        return None


class NetnsGates:
    """Every open gate, by namespace inode, with the builds using each."""

    def __init__(self, own_inode: int, opener: Opener, proc_root: str = "/proc",
                 inode: Callable[[int, str], int | None] = ns_inode,
                 on_close: Callable[[NetnsGate], None] = lambda _gate: None) -> None:
        self.own_inode = own_inode
        self._on_close = on_close
        self._open = opener
        self._proc = proc_root
        self._inode = inode
        self.by_inode: dict[int, _Entry] = {}
        self.by_queue_fd: dict[int, NetnsGate] = {}
        self.failed: dict[int, str] = {}  # inode -> why its gate could not open (logged once)

    def use(self, pid: int, build_id: str) -> NetnsGate | None:
        """Note that ``build_id`` has process ``pid``; returns the gate of its namespace when
        that is not the daemon's, opening it at first use (None: the daemon's namespace, the
        process is gone, or opening failed: logged, and retried at the next use)."""
        inode = self._inode(pid, self._proc)
        if inode is None or inode == self.own_inode:
            return None
        entry = self.by_inode.get(inode)
        if entry is None:
            try:
                gate = self._open(f"{self._proc}/{pid}/ns/net")
            except Exception as exc:  # the backstop still holds its traffic
                if self.failed.get(inode) != str(exc):
                    log.error("cannot gate network namespace %d (pid %d, build %s): %s",
                              inode, pid, build_id, exc)
                self.failed[inode] = str(exc)
                return None
            if gate.inode != inode:  # the process moved between the stat and the open
                log.warning("pid %d changed network namespace while gated", pid)
            self.failed.pop(gate.inode, None)
            entry = self.by_inode.setdefault(gate.inode, _Entry(gate))
            if entry.gate is not gate:  # raced into a namespace we already gate
                gate.close()
            elif gate.queue is not None:
                self.by_queue_fd[gate.queue.fileno()] = gate
                log.info("gated network namespace %d for build %s", gate.inode, build_id)
        entry.users.add(build_id)
        entry.pid = pid
        return entry.gate

    def pids(self) -> list[int]:
        """A process seen in each gated namespace (the last one), for /proc/PID/net."""
        return [e.pid for e in self.by_inode.values() if e.pid]

    def cookies(self) -> set[int]:
        """The cookies of the namespaces gated now."""
        return {e.gate.cookie for e in self.by_inode.values()}

    def of_cookie(self, cookie: int) -> NetnsGate | None:
        return next((e.gate for e in self.by_inode.values() if e.gate.cookie == cookie), None)

    def sync(self, rules: Iterable[BuildRule]) -> list[str]:
        """Give every gate these rules; returns the errors (one gate failing leaves the
        others in sync)."""
        wanted = list(rules)
        errors = []
        for inode, entry in self.by_inode.items():
            try:
                entry.gate.sync(wanted)
            except Exception as exc:
                errors.append(f"netns {inode}: {exc}")
        return errors

    def release(self, build_id: str) -> list[NetnsGate]:
        """A build ended: close each gate it was the last user of; returns them (closed)."""
        closed = []
        for inode, entry in list(self.by_inode.items()):
            entry.users.discard(build_id)
            if not entry.users:
                closed.append(self._close(inode))
        return closed

    def _close(self, inode: int, refusing: Iterable[BuildRule] = ()) -> NetnsGate:
        entry = self.by_inode.pop(inode)
        gate = entry.gate
        if gate.queue is not None:
            self.by_queue_fd.pop(gate.queue.fileno(), None)
        try:
            self._on_close(gate)
        except Exception:
            log.exception("before closing the gate of network namespace %d", inode)
        for error in gate.close(refusing):
            log.error("closing the gate of network namespace %d: %s", inode, error)
        return gate

    def close_all(self, refusing: Iterable[BuildRule] = ()) -> list[NetnsGate]:
        """Close every gate (the daemon stops), leaving ``refusing`` builds refused in each
        (their processes may still run in any of them)."""
        refused = list(refusing)
        return [self._close(inode, refused) for inode in list(self.by_inode)]
