"""Tampering by a build that runs as root: seen, alerted as ``tamper``, and in enforce mode
the build killed.

Five shapes (issue 10, item 4), each a pure decision here fed by the kernel reads the daemon
injects (:class:`TamperOps`):

- ``rules``: our chains or jumps are not as the daemon wrote them (``ruleguard.py``): put
  back within the second, named after the build whose process committed the change;
- ``cgroup``: a member is outside its build's cgroup (it moved itself: its new flows would
  no longer match our rules): moved back;
- ``packet_socket``: a member holds an ``AF_PACKET`` socket (frames below IP, netfilter and
  cgroup BPF: nothing in the kernel judges them);
- ``uid_0``: a member's real or effective uid became 0 when it was not (a setuid-root
  binary, a privilege escalation), from the proc connector's ``PROC_EVENT_UID``;
- ``ptrace``: a member ptrace-attached to a process (``PROC_EVENT_PTRACE``): it could run
  code as any process it may trace, the daemon included.

Kill in enforce mode: ``cgroup.kill`` of the build's cgroup and SIGKILL of each member found
outside it. Each shape alerts once per process (rules: once per change).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from egress_monitor import attribution
from egress_monitor.alerts import Alert, raise_alert
from egress_monitor.builds import Build
from egress_monitor.events import ProcPtrace, ProcUid
from egress_monitor.process_tree import Node
from egress_monitor.ruleguard import RuleGuard, RuleTamper

log = logging.getLogger(__name__)
Ids = tuple[int, int]  # (ruid, euid)
MAX_SEEN = 65536


def gained_root(before: Ids | None, after: Ids) -> str | None:
    """``uid`` or ``euid`` when that id became 0 and was not 0 before; None otherwise, or
    when nothing is known of before (a build that is root from its start gains nothing)."""
    if before is None:
        return None
    if after[0] == 0 and before[0] != 0:
        return "uid"
    if after[1] == 0 and before[1] != 0:
        return "euid"
    return None


def named_by(node: Node) -> Node:
    """Whose role and crate name an act: the process's own, or when it has no crate (a
    short-lived ``iptables`` whose exec could not be read) its nearest ancestor in the same
    build that has one: code below a build script is that crate's."""
    if node.crate is None:
        for up in node.ancestors():
            if up.build is not node.build:
                break
            if up.crate is not None:
                return up
    return node


def outside(current: str | None, cgroup: str) -> bool:
    """Whether a process's cgroup path is neither the build's cgroup nor below it (a
    process that is gone, ``None``, is not outside)."""
    if current is None:
        return False
    return current != cgroup and not current.startswith(cgroup.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class TamperOps:
    """The kernel reads and actions the watch needs (the daemon's; fakes in unit tests)."""

    cgroup_of: Callable[[int], str | None]
    socket_inodes: Callable[[int], set[int]]
    move: Callable[[str, int], object]
    kill_cgroup: Callable[[str], None]
    kill_pid: Callable[[int], None]
    packet_inodes: Callable[[], set[int] | None] | None = None
    # What of the BPF core a root process detached (BpfOwner.intact), when it is loaded.
    bpf_intact: Callable[[], list[str]] | None = None


def nobody(process: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The actor of an act no build is known to have done."""
    return {"process": dict(process) if process else None, "lineage": [], "role": "other",
            "crate": None, "attribution": "none", "build": None}


class TamperWatch:
    """The five checks, their alerts and the kill; the daemon routes uid and ptrace events
    to it and calls :meth:`check` every second."""

    def __init__(self, *, node_of: Callable[[int], Node | None],
                 builds: Callable[[], Iterable[Build]], emit: Callable[[Alert], None],
                 wall: Callable[[], float], enforce: Callable[[], bool],
                 elsewhere: Callable[[Node], bool] = lambda _node: False) -> None:
        self._node_of = node_of
        # Members that belong outside the build's cgroup (a container an engine started for
        # the build keeps its own: engine_launch.py).
        self._elsewhere = elsewhere
        self._builds = builds
        self._emit = emit
        self._wall = wall
        self._enforce = enforce
        self.ops: TamperOps | None = None
        self.rules: RuleGuard | None = None
        self._ids: dict[int, tuple[Node, Ids]] = {}  # pid -> (node, ids) from uid events
        self._packet_seen: set[int] = set()
        self._alerted: set[tuple[str, str, int]] = set()  # (build, what, pid)
        self._bpf_problems: frozenset[str] = frozenset()

    # -- proc connector ------------------------------------------------------------------
    def on_uid(self, ev: ProcUid) -> None:
        """A uid change: a member becoming root is tamper."""
        node = self._node_of(ev.pid)
        if node is None or node.build is None or node.build.ended_ns is not None:
            return
        before = self._known_ids(node)
        self._ids[ev.pid] = (node, (ev.ruid, ev.euid))
        which = gained_root(before, (ev.ruid, ev.euid))
        if which is not None and before is not None:
            self._found("uid_0", node, node.build, {
                "gained": which, "ruid": ev.ruid, "euid": ev.euid,
                "before": {"ruid": before[0], "euid": before[1]}})

    def _known_ids(self, node: Node) -> Ids | None:
        """The ids a member had: the last uid event of it or its nearest ancestor, else the
        uid /proc gave at its last exec."""
        chain = [node, *node.ancestors()]
        for n in chain:
            rec = self._ids.get(n.pid)
            if rec is not None and rec[0] is n:
                return rec[1]
        for n in chain:
            if n.info is not None and n.info.uid is not None:
                return (n.info.uid, n.info.uid)
        return None

    def on_ptrace(self, ev: ProcPtrace) -> None:
        """A ptrace attach: by a member, tamper (whatever the target)."""
        node = self._node_of(ev.tracer)
        if node is None or node.build is None or node.build.ended_ns is not None:
            return
        target = self._node_of(ev.target)
        self._found("ptrace", node, node.build, {
            "target_pid": ev.target, "target_exe": target.exe if target else None,
            "target_in_build": target is not None and target.build is node.build})

    # -- every second --------------------------------------------------------------------
    def check(self) -> None:
        """Rules, cgroups, packet sockets; forget what exited."""
        for pid in [p for p, (n, _) in self._ids.items() if n.exited_ns is not None]:
            del self._ids[pid]
        if self.rules is not None:
            found = self.rules.check()
            if found is not None:
                self._rules_changed(found)
        if self.ops is None:
            return
        self._check_bpf()
        builds = [b for b in self._builds() if b.ended_ns is None]
        self._check_cgroups(builds)
        self._check_packet_sockets(builds)

    def _rules_changed(self, found: RuleTamper) -> None:
        assert self.rules is not None
        evidence = {"differences": list(found.differences), "restored": found.restored,
                    "detector": self.rules.detector,
                    "committed_by": [{"pid": c.pid, "comm": c.comm}
                                     for c in found.committers]}
        by: dict[str, tuple[Node, Build]] = {}
        for c in found.committers:
            node = self._node_of(c.pid) if c.pid else None
            if node is not None and node.build is not None and node.build.id not in by:
                by[node.build.id] = (node, node.build)
        log.error("firewall rules changed by someone else (%s); %s",
                  "; ".join(found.differences),
                  "restored" if found.restored else "restore FAILED")
        if not by:
            # Not a build's doing as far as the kernel says (or it did not say): an alert
            # all the same, with no build to name or kill.
            first = found.committers[0] if found.committers else None
            actor = nobody({"pid": first.pid, "exe": None, "comm": first.comm}
                            if first else None)
            self._emit(raise_alert(wall=self._wall(), kind="tamper", severity="critical",
                                   rule="tamper", actor=actor, blocked=False,
                                   evidence={"tamper": "rules", **evidence,
                                             "build_killed": False}))
            return
        for node, build in by.values():
            self._found("rules", node, build, evidence, once=False)

    def _check_bpf(self) -> None:
        """A BPF program detached: an alert for each new set of problems. Nothing says who
        did it (no event), so no build is named or killed."""
        assert self.ops is not None
        if self.ops.bpf_intact is None:
            return
        problems = frozenset(self.ops.bpf_intact())
        if problems and problems != self._bpf_problems:
            log.error("BPF programs detached: %s", "; ".join(sorted(problems)))
            self._emit(raise_alert(wall=self._wall(), kind="tamper", severity="critical",
                                   rule="tamper", actor=nobody(), blocked=False,
                                   evidence={"tamper": "bpf", "problems": sorted(problems),
                                             "build_killed": False}))
        self._bpf_problems = problems

    def _check_cgroups(self, builds: list[Build]) -> None:
        assert self.ops is not None
        for build in builds:
            if build.cgroup is None:
                continue
            for node in list(build.members):
                if node.exited_ns is not None or self._elsewhere(node):
                    continue
                current = self.ops.cgroup_of(node.pid)
                if not outside(current, build.cgroup):
                    continue
                moved = False
                try:
                    moved = bool(self.ops.move(build.cgroup, node.pid))
                except OSError as exc:
                    log.warning("cannot move pid %d back into %s: %s", node.pid,
                                build.cgroup, exc)
                self._found("cgroup", node, build, {"cgroup": current,
                                                    "build_cgroup": build.cgroup,
                                                    "moved_back": moved},
                            outside_pids=[node.pid])

    def _check_packet_sockets(self, builds: list[Build]) -> None:
        assert self.ops is not None
        if self.ops.packet_inodes is None:
            return
        inodes = self.ops.packet_inodes()
        if inodes is None:
            return
        new, self._packet_seen = inodes - self._packet_seen, inodes
        if not new or not builds:
            return
        # Only new sockets, and only members' fds: a listdir and readlinks per member, and
        # only in a second when a packet socket appeared somewhere on the host.
        for build in builds:
            for node in list(build.members):
                if node.exited_ns is None:
                    hit = self.ops.socket_inodes(node.pid) & new
                    if hit:
                        self._found("packet_socket", node, build, {"inodes": sorted(hit)})

    # -- acting --------------------------------------------------------------------------
    def _found(self, what: str, node: Node, build: Build, evidence: Mapping[str, Any], *,
               once: bool = True, outside_pids: Iterable[int] = ()) -> None:
        key = (build.id, what, node.pid)
        if once and key in self._alerted:
            return
        if len(self._alerted) >= MAX_SEEN:
            self._alerted.clear()
        self._alerted.add(key)
        killed = self._kill(build, set(outside_pids)) if self._enforce() else False
        log.error("tamper (%s) by pid %d in build %s%s", what, node.pid, build.id,
                  ": build killed" if killed else "")
        actor = attribution.actor(node, build)
        holder = named_by(node)
        if holder is not node:
            actor.update(role=str(attribution.role_of(holder)), crate=attribution.actor(
                holder, build)["crate"])
        self._emit(raise_alert(wall=self._wall(), kind="tamper", severity="critical",
                               rule="tamper", actor=actor, blocked=killed,
                               evidence={"tamper": what, **evidence, "build_killed": killed}))

    def _kill(self, build: Build, stray: set[int]) -> bool:
        """cgroup.kill of the build's cgroup, and SIGKILL of each member outside it."""
        if self.ops is None:
            return False
        killed = False
        for node in list(build.members):
            if node.exited_ns is None and (build.cgroup is None or outside(
                    self.ops.cgroup_of(node.pid), build.cgroup)):
                stray.add(node.pid)
        if build.cgroup is not None:
            try:
                self.ops.kill_cgroup(build.cgroup)
                killed = True
            except OSError as exc:
                log.error("kill of build %s (tamper) failed: %s", build.id, exc)
        for pid in sorted(stray):
            with contextlib.suppress(ProcessLookupError):
                self.ops.kill_pid(pid)
                killed = True
        if killed:
            build.killed_by = "tamper"
        return killed
