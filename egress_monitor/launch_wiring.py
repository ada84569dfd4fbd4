"""The daemon's side of containers started through an engine (part of the composition root).

Connects :class:`~egress_monitor.engine_launch.LaunchWatch` to the kernel: engine requests
come from :class:`~egress_monitor.engines.EngineWatch`, container cgroups from inotify
(``sources/cgroup_watch.py``), and a tied container's processes are enrolled here, in this
order: the kernel member (``members`` map: the build's queue, ``ROLE_CRATE``: crate code,
no privileges; from then on the backstop drops its packets that have no verdict, and its
forks are members too), the tree node (the requester's role and crate, held to crate code),
then its network namespace's gate (``netns_gates``). What the container sent before the
first step is not the build's: it is judged by nobody (docs/netns.md, "What is not
covered").
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from egress_monitor.alerts import raise_alert
from egress_monitor.bpf import programs as bpf_programs
from egress_monitor.builds import Build
from egress_monitor.containers import Container
from egress_monitor.engine_launch import Launched, LaunchWatch
from egress_monitor.launches import Request, Tie
from egress_monitor.process_tree import Node
from egress_monitor.roles import Crate, Role
from egress_monitor.sources.cgroup_watch import DEFAULT_PARENTS, Appeared, ContainerCgroups

if TYPE_CHECKING:
    from egress_monitor.daemon import Daemon

log = logging.getLogger(__name__)
_CODE_ROLES = (Role.BUILD_SCRIPT, Role.CRATE_BINARY)


def container_fields(c: Container) -> dict[str, Any]:
    return {"runtime": c.runtime, "id": c.id, "pod": c.pod}


class LaunchWiring:
    """Owned by the daemon; ``watch`` is the pure-ish bookkeeping, ``source`` the inotify."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.source: ContainerCgroups | None = None
        self._joined: dict[str, int] = {}  # container cgroup rel -> cgroup id, in the kernel
        self.watch = LaunchWatch(
            builds=self._build, procs=lambda rel: self.d.cgroups.procs(rel),
            enrol=self._enrol, untied=self._untied,
            watch=lambda rel: self.source.watch_container(rel) if self.source else None,
            forget=self._forget,
            clock=time.monotonic_ns)

    def start(self, stack: contextlib.ExitStack) -> None:
        """Watch the container parents (only with the kernel side: membership needs it)."""
        if self.d.bpf is None:
            return
        parents = (*DEFAULT_PARENTS, *self.d.config.engine_cgroups)
        try:
            self.source = ContainerCgroups(self.d.cgroups.mount, parents)
        except OSError as exc:
            log.error("container cgroups are not watched (%s): containers an engine starts "
                      "for a build are not made part of it", exc)
            return
        stack.callback(self.source.close)

    def request(self, build: Build, node: Node | None, at_ns: int, engine: str) -> None:
        """EngineWatch saw a member ask an engine."""
        role = node.role if node is not None and node.role is not None else Role.OTHER
        crate = node.crate if node is not None else None
        self.watch.request(Request(build.id, node.pid if node else 0, str(role),
                                   crate.name if crate else None, engine, at_ns,
                                   crate_version=crate.version if crate else None))

    def changes(self) -> None:
        """The inotify descriptor is readable."""
        if self.source is None:
            return
        found = self.source.read(time.monotonic_ns())
        if any(isinstance(ch, Appeared) for ch in found):
            # Requests first: a member's connect or CLI exec a moment ago is known before
            # the container is decided on.
            self.d._drain_proc()
            self.d.engines.take_hits()
        for ch in found:
            launched = self.watch.change(ch)
            if launched is not None:
                self.d.metrics.engine_containers.labels("tied").inc()
                self._join(launched)

    def tick(self) -> None:
        if self.source is not None:
            self.source.refresh()
            self.watch.tick()

    def of_node(self, node: Node | None) -> Launched | None:
        """The tied container a process (or an ancestor of it, up to the first) runs in."""
        if not self.watch.by_pid:
            return None  # the usual case: no container tied, no walk
        while node is not None:
            found = self.watch.of_pid(node.pid)
            if found is not None:
                return found
            node = node.parent
        return None

    def of_record(self, record: dict[str, Any]) -> Launched | None:
        process = record.get("process")
        pid = process.get("pid") if isinstance(process, dict) else None
        return self.of_node(self.d.tree.get(pid)) if isinstance(pid, int) else None

    def holds(self, build: Build) -> bool:
        """Whether a container tied to ``build`` still has processes: the build lasts until
        they end (they are its members)."""
        return any(found.build is build and self.d.cgroups.populated(found.rel)
                   for found in self.watch.launched.values())

    def _join(self, launched: Launched) -> None:
        """Tell the kernel: a process that makes a socket in this cgroup is the build's
        member from that instruction (``sock_create``), before the daemon has read the
        cgroup's processes (nothing such a process sends leaves unjudged meanwhile)."""
        if self.d.bpf is None:
            return
        try:
            cgroup_id = os.stat(self.d.cgroups.path(launched.rel)).st_ino
            self.d.bpf.join_cgroup(cgroup_id, bpf_programs.member_value(
                launched.build.queue, bpf_programs.ROLE_CRATE))
        except OSError as exc:
            log.warning("container %s: its cgroup's processes join the build only once "
                        "read (%s)", launched.container.id, exc)
            return
        self._joined[launched.rel] = cgroup_id
        log.info("container %s: cgroup %d joins build %s in the kernel (monotonic %d)",
                 launched.container.id, cgroup_id, launched.build.id, time.monotonic_ns())

    def _forget(self, rel: str) -> None:
        cgroup_id = self._joined.pop(rel, None)
        if cgroup_id is not None and self.d.bpf is not None:
            with contextlib.suppress(OSError):
                self.d.bpf.leave_cgroup(cgroup_id)
        if self.source is not None:
            self.source.forget(rel)

    def _build(self, build_id: str) -> Build | None:
        return next((b for b in self.d.registry.active() if b.id == build_id), None)

    def _enrol(self, pid: int, launched: Launched) -> bool:
        d, build, req = self.d, launched.build, launched.request
        if d.bpf is None or build.ended_ns is not None or d.procfs.ppid(pid) is None:
            return False
        d.bpf.set_member(pid, bpf_programs.member_value(build.queue, bpf_programs.ROLE_CRATE),
                         only_new=True)
        now = time.monotonic_ns()  # a member from here on: the backstop holds its packets
        role = Role(req.role) if req.role in _CODE_ROLES else Role.OTHER
        crate = Crate(req.crate, req.crate_version) if req.crate else None
        d.tree.attach(pid, build, role, crate, time.monotonic_ns(), d.procfs.info(pid),
                      basis=f"container {launched.container.id} started by {req.engine} for "
                      f"pid {req.pid}")
        if d.netns_gates is not None:
            known = len(d.netns_gates.by_inode)
            nsg = d.netns_gates.use(pid, build.id)
            if nsg is not None and len(d.netns_gates.by_inode) > known:
                log.info("network namespace %d of container %s gated %.1f ms after its "
                         "cgroup appeared (monotonic %d)", nsg.inode, launched.container.id,
                         (time.monotonic_ns() - launched.appeared_ns) / 1e6,
                         time.monotonic_ns())
        log.info("pid %d of container %s is a member of build %s (%.1f ms after its cgroup "
                 "appeared; monotonic %d; %.2f ms after cgroup.procs was read)", pid,
                 launched.container.id, build.id, (now - launched.appeared_ns) / 1e6, now,
                 (now - launched.read_ns) / 1e6)
        return True

    def _untied(self, rel: str, container: Container, decided: Tie) -> None:
        d = self.d
        d.metrics.engine_containers.labels(
            "ambiguous" if decided.outcome == "ambiguous" else "build_gone").inc()
        for build_id in decided.candidates:
            build = self._build(build_id)
            if build is None:
                continue
            d._emit(raise_alert(
                wall=d._wall(), kind="container_engine", severity="warning",
                rule="container_engine", build=build, blocked=False,
                evidence={"container": container_fields(container), "cgroup": rel,
                          "tied": False, "why": decided.outcome,
                          "candidates": list(decided.candidates)}))
