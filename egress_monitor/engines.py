"""Laundering through a container engine: a build asking Docker, Podman, containerd or
BuildKit to run something for it, and the watch that answers.

Two ways in, one alert (``container_engine``, naming build, crate, process and engine):

- **a connect to an engine's socket** (``connect()`` or an addressed datagram), seen by the
  kernel (``bpf/engines.py``): a path that is an engine socket's configured or resolved path
  is matched there (and refused there when refusing is on, before the engine sees a byte);
  any other path a member connected to is resolved here, as that process would resolve it,
  to the engine socket's file identity (symlinks, bind mounts, ``/proc/PID/root/...``,
  relative paths: an alert and kill-build, after the fact);
- **an exec of a container CLI** (``docker``, ``podman``, ``nerdctl``, ``buildah``,
  ``kubectl``) by a build member: by the file's name (the executable's and the path given to
  execve) or its identity (the CLIs found on ``$PATH``: a hard link under another name too).

Policy ``container_engine`` (default ``alert``): ``deny`` refuses the connect in the kernel
in enforce mode (the build goes on; a CLI it runs fails to reach its engine), ``kill-build``
refuses it and kills the build in enforce mode. Audit mode never refuses or kills.
Any process of a build counts, cargo included: cargo has no business with an engine.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, Literal

from egress_monitor.alerts import Alert, raise_alert
from egress_monitor.bpf import programs
from egress_monitor.bpf.engines import Hit
from egress_monitor.bpf.owner import BpfOwner
from egress_monitor.builds import Build
from egress_monitor.policy.schema import Policy
from egress_monitor.process_tree import Node
from egress_monitor.sources import engine_sockets as es

log = logging.getLogger(__name__)
EngineAction = Literal["alert", "deny", "kill-build"]
REFRESH_S = 2.0
MAX_SEEN = 4096
_LABELS = (("docker", "docker"), ("podman", "podman"), ("containerd", "containerd"),
           ("buildkit", "buildkit"))


def engine_label(path: str) -> str:
    """Which engine a socket path is, by its name (``engine`` when unknown)."""
    name = path.lower()
    return next((label for key, label in _LABELS if key in name), "engine")


def refusing(action: EngineAction, mode: str) -> bool:
    """Whether the kernel refuses members' connects to engine sockets."""
    return mode == "enforce" and action in ("deny", "kill-build")


def kills(action: EngineAction, mode: str) -> bool:
    return mode == "enforce" and action == "kill-build"


def cli_of(exe: str | None, filename: str | None, identity: es.Identity | None,
           clis: dict[es.Identity, str], names: tuple[str, ...] = es.CLI_NAMES) -> str | None:
    """The container CLI an exec runs, by identity or by name; None when it is none."""
    if identity is not None and identity in clis:
        return clis[identity]
    for path in (exe, filename):
        base = os.path.basename((path or "").removesuffix(" (deleted)"))
        if base in names:
            return base
    return None


def build_of(hit: Hit, node: Node | None, by_queue: Callable[[int], Build | None],
             node_of: Callable[[int], Node | None]) -> Build | None:
    """The build of a hit: the tree's, else the kernel's member value (a build id, or the
    tgid that exec'd cargo while the build was pending)."""
    if node is not None and node.build is not None:
        return node.build
    low = hit.member & 0xFFFFFFFF
    if hit.member & programs.PENDING:
        root = node_of(low)
        return root.build if root is not None else None
    return by_queue(low)


class EngineWatch:
    """Engine sockets in the kernel's map, the refusal switch, and the alerts."""

    def __init__(self, *, owner: Callable[[], BpfOwner | None], sockets: tuple[str, ...],
                 node_of: Callable[[int], Node | None], by_queue: Callable[[int], Build | None],
                 emit: Callable[[Alert], None], policy: Callable[[], Policy],
                 mode: Callable[[], str], kill: Callable[[str], None],
                 wall: Callable[[], float], clock: Callable[[], float],
                 filename_of: Callable[[int], str | None] = lambda _pid: None,
                 on_request: Callable[[Build, Node | None, int, str], None] = (
                     lambda _b, _n, _t, _e: None)) -> None:
        self._owner = owner
        self._on_request = on_request  # (build, requester, CLOCK_MONOTONIC ns, engine)
        self.paths = (*es.DEFAULT_SOCKETS, *sockets)
        self._node_of, self._by_queue, self._emit = node_of, by_queue, emit
        self._policy, self._mode, self._kill = policy, mode, kill
        self._wall, self._clock, self._filename_of = wall, clock, filename_of
        self.sockets: list[es.EngineSocket] = []
        self.clis = es.cli_files(os.environ.get("PATH"))
        self._refuse: bool | None = None
        self._next_refresh = 0.0
        self._said = False
        self._seen: set[tuple[str, int, str]] = set()

    def refresh(self) -> None:
        """Find the engine sockets again (engines restart, users log in) and tell the
        kernel their configured and resolved paths."""
        self.sockets = es.find_sockets(self.paths)
        owner = self._kernel()
        if owner is not None:
            paths: dict[str, int] = {}
            for i, sock in enumerate(self.sockets):
                paths.setdefault(sock.path, i)
                paths.setdefault(sock.real, i)
            owner.set_engine_paths(paths)

    def _kernel(self) -> BpfOwner | None:
        owner = self._owner()
        if owner is None or owner.engine_fds is None:
            if not self._said:
                self._said = True
                why = "running degraded" if owner is None else owner.engine_error
                log.warning("container engine sockets are not watched in the kernel (%s): "
                            "only container CLIs a build runs are seen", why)
            return None
        return owner

    def tick(self) -> None:
        """Refresh now and then, keep the kernel's switch in line with policy and mode,
        and turn the kernel's hits into alerts."""
        now = self._clock()
        if now >= self._next_refresh:
            self._next_refresh = now + REFRESH_S
            self.refresh()
        owner = self._kernel()
        if owner is None:
            return
        refuse = refusing(self._policy().container_engine, self._mode())
        if refuse != self._refuse:
            owner.set_engine_refuse(refuse)
            self._refuse = refuse
        self.take_hits(owner)

    def take_hits(self, owner: BpfOwner | None = None) -> None:
        """Turn the kernel's hits recorded so far into alerts and requests (also called
        when a container cgroup appears, so that its request is known first)."""
        owner = owner or self._kernel()
        if owner is None:
            return
        for hit in owner.take_engine_hits():
            self._hit(hit)

    def _hit(self, hit: Hit) -> None:
        if hit.engine is not None and hit.engine < len(self.sockets):
            sock: es.EngineSocket | None = self.sockets[hit.engine]
        else:
            ident = es.resolve_as(hit.tgid, hit.path)
            sock = next((s for s in self.sockets if s.identity == ident), None) \
                if ident is not None else None
        if sock is None:
            return  # a Unix socket that is no engine's
        node = self._node_of(hit.tgid)
        build = build_of(hit, node, self._by_queue, self._node_of)
        if build is None:
            return
        self._on_request(build, node, hit.ktime_ns, engine_label(sock.path))
        self._alert(node, build, {"engine": engine_label(sock.path), "socket": sock.path,
                                  "path": hit.path,
                                  "via": "datagram" if hit.datagram else "connect",
                                  "refused": hit.refused}, key=f"{hit.tgid}:{hit.path}")

    def on_exec(self, pid: int) -> None:
        """A build member's exec of a container CLI: the same alert (and kill-build)."""
        node = self._node_of(pid)
        if node is None or node.build is None:
            return
        try:
            filename = self._filename_of(pid)
        except OSError:
            filename = None  # the kernel's record cannot be read: name and identity remain
        cli = cli_of(node.exe, filename, es.file_identity(node.exe), self.clis)
        if cli is not None:
            self._on_request(node.build, node, time.monotonic_ns(), cli)
            self._alert(node, node.build, {"engine": cli, "cli": cli, "via": "exec",
                                           "refused": False}, key=f"{pid}:exec:{cli}")

    def _alert(self, node: Node | None, build: Build, evidence: dict[str, Any],
               key: str) -> None:
        seen = (build.id, node.pid if node else 0, key)
        if seen in self._seen:
            return
        if len(self._seen) >= MAX_SEEN:
            self._seen.clear()
        self._seen.add(seen)
        action = self._policy().container_engine
        killed = False
        if kills(action, self._mode()) and build.cgroup and build.ended_ns is None:
            try:
                self._kill(build.cgroup)
                killed = True
                build.killed_by = "container_engine"
            except OSError as exc:
                log.error("kill-build of %s failed: %s", build.id, exc)
        self._emit(raise_alert(wall=self._wall(), kind="container_engine",
                               severity="critical", rule="container_engine", owner=node,
                               build=build, blocked=bool(evidence["refused"]) or killed,
                               evidence={**evidence, "action": action,
                                         "build_killed": killed}))
