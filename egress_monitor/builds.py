"""Build lifecycle: identity, queue slot, live members, and the end-of-build summary.

Pure: the registry hands out queue numbers and ids and keeps counts; creating cgroups and
rules for a build is the daemon's work, driven by the effects the process tree returns.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from egress_monitor.process_tree import Node
    from egress_monitor.roles import Crate

COMPILED_MAX = 4096  # build scripts one build remembers compiling (a large workspace: ~500)


class NoQueueSlot(RuntimeError):
    """Every queue number of the configured range is in use by a live build."""


@dataclass(slots=True, eq=False)
class Build:
    """One build: a root process and everything it forks, in its own cgroup and queue."""

    id: str
    root: Node
    queue: int
    started_ns: int
    started_wall: float
    via: str  # "cargo", "build-script-runner", "build-script", "exec" or "adopted"
    root_exe: str | None = None
    cwd: str | None = None
    members: set[Node] = field(default_factory=set)
    cgroup: str | None = None  # path below the cgroup2 mount, once placed
    announced: bool = False
    ended_ns: int | None = None
    connections: Counter[tuple[str, str]] = field(default_factory=Counter)
    # (role, what the policy said): in audit mode what enforce mode would have done.
    policy_decisions: Counter[tuple[str, str]] = field(default_factory=Counter)
    processes_seen: int = 0
    killed_by: str | None = None  # the rule whose kill-build ended the build
    build_scripts: set[str] = field(default_factory=set)  # "name version" of crates run
    verdict_keys: set[bytes] = field(default_factory=set)  # flows allowed in the kernel
    ahead: dict[int, set[bytes]] = field(default_factory=dict)  # tgid -> bpf/fast.py keys
    # build-script out-dir -> package, as the compilers cargo ran named them (provenance
    # compiled_build_script), oldest first; at most COMPILED_MAX
    compiled_scripts: dict[str, Crate] = field(default_factory=dict)

    def compiled(self, out_dir: str, crate: Crate) -> None:
        """Remember that cargo compiled ``crate``'s build script into ``out_dir``; the
        oldest entry goes once there are ``COMPILED_MAX``."""
        self.compiled_scripts.pop(out_dir, None)
        self.compiled_scripts[out_dir] = crate
        if len(self.compiled_scripts) > COMPILED_MAX:
            del self.compiled_scripts[next(iter(self.compiled_scripts))]

    def leave(self, node: Node) -> None:
        """A member exited: drop it, remembering the crate whose build script it ran."""
        self.members.discard(node)
        if node.crate is not None and str(node.role) == "build-script":
            self.build_scripts.add(f"{node.crate.name} {node.crate.version or ''}".strip())

    def record_connection(self, role: str, decision: str,
                          policy_decision: str | None = None) -> None:
        """Count one connection for the build_end summary: the verdict applied and what the
        policy said (``allow``, ``deny``, ``alert``, ``kill-build``)."""
        self.connections[(role, decision)] += 1
        if policy_decision is not None:
            self.policy_decisions[(role, policy_decision)] += 1

    def would_be_denied(self) -> int:
        """Connections the policy refuses that were let through (audit mode): what enforce
        mode would have broken."""
        refused = sum(n for (_r, a), n in self.policy_decisions.items()
                      if a in ("deny", "kill-build"))
        denied = sum(n for (_r, d), n in self.connections.items() if d == "deny")
        return max(0, refused - denied)

    def summary(self, now_ns: int) -> dict[str, Any]:
        """The ``summary`` object of a ``build_end`` event."""
        by_role: dict[str, dict[str, int]] = {}
        for (role, decision), count in sorted(self.connections.items()):
            by_role.setdefault(role, {})[decision] = count
        policy_by_role: dict[str, dict[str, int]] = {}
        for (role, action), count in sorted(self.policy_decisions.items()):
            policy_by_role.setdefault(role, {})[action] = count
        return {
            "duration_s": round((now_ns - self.started_ns) / 1e9, 3),
            "processes": self.processes_seen,
            "connections": sum(self.connections.values()),
            "connections_by_role": by_role,
            "policy_decisions_by_role": policy_by_role,
            "would_be_denied": self.would_be_denied(),
            "build_scripts": sorted(self.build_scripts),
            "killed_by_rule": self.killed_by,
        }


class BuildRegistry:
    """Allocates build ids and queue numbers; knows the live builds.

    Queue numbers come from ``[queue_base, queue_base + max_builds)`` and are reused once a
    build ends, so the firewall's queue rules and the queue socket's bindings stay bounded.
    """

    def __init__(self, queue_base: int, max_builds: int) -> None:
        if not 0 <= queue_base <= 65535 - max_builds:
            raise ValueError("queue range must lie within 0..65535")
        self._free = list(range(queue_base + max_builds - 1, queue_base - 1, -1))
        self._by_queue: dict[int, Build] = {}
        self.total_started = 0

    def start(self, root: Node, *, ts_ns: int, wall: float, via: str,
              queue: int | None = None, build_id: str | None = None) -> Build:
        """Register a new build rooted at ``root``; raises NoQueueSlot when all are taken.

        ``queue`` and ``build_id`` are given when adopting a build a previous daemon made.
        """
        if queue is None:
            if not self._free:
                raise NoQueueSlot("every build queue slot is in use")
            queue = self._free.pop()
        elif queue in self._free:
            self._free.remove(queue)
        else:
            raise NoQueueSlot(f"queue {queue} is outside the range or already in use")
        build_id = build_id or f"{int(wall * 1000):x}-{root.pid}"
        build = Build(id=build_id, root=root, queue=queue, started_ns=ts_ns,
                      started_wall=wall, via=via)
        self._by_queue[queue] = build
        self.total_started += 1
        return build

    def end(self, build: Build, ts_ns: int) -> None:
        """Forget a build and free its queue number."""
        build.ended_ns = ts_ns
        if self._by_queue.pop(build.queue, None) is build:
            self._free.append(build.queue)

    def by_queue(self, queue: int) -> Build | None:
        """The live build that owns this queue number."""
        return self._by_queue.get(queue)

    def active(self) -> list[Build]:
        """Live builds, oldest first."""
        return sorted(self._by_queue.values(), key=lambda b: b.started_ns)
