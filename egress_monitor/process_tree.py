"""The process tree: lineage that survives reparenting, build membership, roles and crates.

Pure and single-threaded. The daemon feeds it proc-connector events in kernel order and a
``reader`` that returns :class:`ExecInfo` for a pid (the only window onto /proc, injected so
that tests replay recorded sequences). Methods return *effects* for the daemon to carry out:
place a build in a cgroup, move a straggler into it, check whether a build has ended.

Lineage is kept by object references: a node points at the node that really forked it, so a
double-forked, ``setsid``-ed process still knows its build after its parent exits and init
adopts it. A pid is looked up only through the index; once an exited node is pruned from the
index (after ``grace_ns``), it lives on only as long as a descendant still references it,
which bounds memory to live processes and their ancestors.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from egress_monitor.builds import Build, BuildRegistry
from egress_monitor.events import ExecInfo, ProcExec, ProcExit, ProcFork
from egress_monitor.provenance import K_CARGO, K_CRATE, KernelExec, Provenance, Runner, capped
from egress_monitor.provenance import classify as by_provenance
from egress_monitor.roles import Crate, Role, classify, crate_of, is_build_script, starts_build

# reader(pid, full): full=False asks only for exe (cheap, for processes outside builds).
Reader = Callable[[int, bool], ExecInfo]


class Kernel(Protocol):
    """The kernel's view of execs (bpf), for roles by provenance; None: names (degraded)."""

    def exec_of(self, pid: int, since_ns: int, transition: bool = False) -> KernelExec | None:
        """What the kernel recorded for the pid's latest exec, if it was made at or after
        ``since_ns`` (the process's start: an older record is an earlier process's with
        the same pid), else None. ``transition``: the exec being read is the first since the
        process was cargo (or outside any build), so the kernel's record of the exec cargo
        made is wanted even if a re-exec has overwritten the latest."""

    def mirror(self, pid: int, info: ExecInfo, before: Role | None,
               in_build: bool) -> KernelExec | None:
        """For a process the kernel never saw exec: what it would have decided, by the
        identity of the file it runs (``/proc/PID/exe``)."""


@dataclass(slots=True, eq=False)
class Node:
    """One process as the tree knows it."""

    pid: int
    parent: Node | None
    build: Build | None = None
    role: Role | None = None
    crate: Crate | None = None
    info: ExecInfo | None = None
    started_ns: int = 0
    exited_ns: int | None = None
    basis: str | None = None  # what the role rests on (kernel provenance), for events
    ceiling: int = K_CARGO  # the highest kernel role it may reach again (roles only go down)
    runner: Runner | None = None  # a configured build-script runner (or its fork, not exec'd)

    @property
    def exe(self) -> str | None:
        """The executable at the last exec the tree saw, if read."""
        return self.info.exe if self.info else None

    def ancestors(self) -> Iterator[Node]:
        """Parents upward, nearest first."""
        node = self.parent
        while node is not None:
            yield node
            node = node.parent


@dataclass(frozen=True, slots=True)
class BuildCreated:
    """A build was found: put its root and ``members`` in a new cgroup, bind its queue."""

    build: Build


@dataclass(frozen=True, slots=True)
class BuildAnnounced:
    """Emit ``build_start`` for this build (its root's program is known now)."""

    build: Build


@dataclass(frozen=True, slots=True)
class Joined:
    """``node`` became a member of ``build`` by fork: make sure the kernel agrees."""

    node: Node
    build: Build


@dataclass(frozen=True, slots=True)
class MaybeEnded:
    """The last member of ``build`` the tree knew of exited: check the cgroup, then end it."""

    build: Build


Effect = BuildCreated | BuildAnnounced | Joined | MaybeEnded


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One process as /proc shows it during a seed or resync."""

    pid: int
    ppid: int
    info: ExecInfo
    build_queue: int | None = None  # the build cgroup it is in, by queue number


class ProcessTree:
    """Lineage, roles and builds from fork/exec/exit events."""

    def __init__(self, registry: BuildRegistry, reader: Reader, *,
                 clock_wall: Callable[[], float], grace_ns: int = 30_000_000_000,
                 kernel: Kernel | None = None) -> None:
        self.registry = registry
        self.kernel = kernel
        self._read = reader
        self._wall = clock_wall
        self._grace_ns = grace_ns
        self._index: dict[int, Node] = {}
        self._exited: deque[Node] = deque()

    # -- lookups ---------------------------------------------------------------------------
    def get(self, pid: int) -> Node | None:
        """The node the pid currently names (a live process, or a recently exited one)."""
        return self._index.get(pid)

    def __len__(self) -> int:
        return len(self._index)

    @staticmethod
    def lineage(node: Node) -> list[Node]:
        """The chain from the build's root down to ``node`` (just ``node`` outside builds)."""
        chain = [node]
        build = node.build
        if build is None:
            return chain
        for ancestor in node.ancestors():
            if ancestor.build is not build:
                break
            chain.append(ancestor)
            if ancestor is build.root:
                break
        chain.reverse()
        return chain

    # -- events ----------------------------------------------------------------------------
    def on_fork(self, ev: ProcFork) -> list[Effect]:
        """A process forked; the child inherits build, role, crate and program."""
        parent = self._index.get(ev.parent)
        if parent is None:
            parent = self._add(ev.parent, None, ev.ts_ns)
        child = Node(pid=ev.child, parent=parent, build=parent.build, role=parent.role,
                     crate=parent.crate, info=parent.info, started_ns=ev.ts_ns,
                     basis=parent.basis, ceiling=parent.ceiling, runner=parent.runner)
        self._index[ev.child] = child
        if child.build is None or child.build.ended_ns is not None:
            child.build = None
            return []
        child.build.members.add(child)
        child.build.processes_seen += 1
        return [Joined(child, child.build)]

    def on_exec(self, ev: ProcExec) -> list[Effect]:
        """A process exec'd: maybe a build starts; inside a build, re-classify it."""
        node = self._index.get(ev.pid)
        if node is None:
            node = self._add(ev.pid, None, ev.ts_ns)
        kernel = self.kernel.exec_of(
            ev.pid, node.started_ns, transition=node.build is None or node.role is Role.CARGO) \
            if self.kernel is not None else None
        if node.build is None:
            cheap = self._read(ev.pid, False)
            starts = kernel is not None and kernel.started if self.kernel is not None \
                else starts_build(cheap)
            if not starts:
                node.info = cheap
                return []
            return self._start(node, ev.ts_ns, self._exec_info(node, kernel), kernel=kernel)
        info = self._exec_info(node, kernel)
        node.info = info
        self._classify(node, info, node.role, node.crate, kernel, exec_seen=True,
                       prior_runner=node.runner)
        build = node.build
        if node is build.root and not build.announced:
            build.root_exe = info.exe
            build.cwd = build.cwd or info.cwd
            build.announced = True
            return [BuildAnnounced(build)]
        return []

    def on_exit(self, ev: ProcExit) -> list[Effect]:
        """A process exited; it stays in the index for ``grace_ns`` for late flows."""
        node = self._index.get(ev.pid)
        if node is None or node.exited_ns is not None:
            return []
        node.exited_ns = ev.ts_ns
        self._exited.append(node)
        build = node.build
        if build is None or build.ended_ns is not None:
            return []
        build.leave(node)
        return [] if build.members else [MaybeEnded(build)]

    def adopt(self, pid: int, ppid: int, ts_ns: int, info: ExecInfo) -> tuple[Build, list[Effect]]:
        """Make ``pid`` the root of a build now (``egress-monitor exec``).

        ``build_start`` waits for the root's next exec, so that it names the real command
        rather than the launcher. A pid already in a build stays in that build.
        """
        node = self._index.get(pid)
        if node is None or node.exited_ns is not None:
            node = self._add(pid, self._index.get(ppid), ts_ns)
        if node.build is not None:
            return node.build, []
        node.info = info
        build = self.registry.start(node, ts_ns=ts_ns, wall=self._wall(), via="exec")
        build.cwd = info.cwd
        self._enter(node, build, None)
        return build, [BuildCreated(build)]

    def attach(self, pid: int, build: Build, role: Role, crate: Crate | None, ts_ns: int,
               info: ExecInfo, basis: str) -> Node | None:
        """Make ``pid``, a process outside every build, a member of ``build`` with this role
        and crate (a container an engine started for the build: engine_launch.py). It never
        rises above crate code again. None when the pid is in a build already."""
        node = self._index.get(pid)
        if node is None or node.exited_ns is not None:
            node = self._add(pid, None, ts_ns)
        if node.build is not None:
            return None
        node.info = node.info or info
        node.build, node.role, node.crate = build, role, crate
        node.basis, node.ceiling = basis, K_CRATE
        build.members.add(node)
        build.processes_seen += 1
        return node

    def restore(self, pid: int, ts_ns: int, info: ExecInfo, *, queue: int,
                build_id: str) -> Build:
        """Re-register a build found in a cgroup a previous daemon left (adoption on restart).

        ``pid`` becomes its root; a following :meth:`resync` adds the other processes found in
        the build's cgroup.
        """
        node = self._index.get(pid)
        if node is None or node.exited_ns is not None:
            node = self._add(pid, None, ts_ns)
        node.info = info
        build = self.registry.start(node, ts_ns=ts_ns, wall=self._wall(), via="adopted",
                                    queue=queue, build_id=build_id)
        build.root_exe, build.cwd, build.announced = info.exe, info.cwd, True
        self._enter(node, build, None)
        return build

    def end_build(self, build: Build, ts_ns: int) -> None:
        """The daemon confirmed the build's cgroup is empty: forget the build."""
        self.registry.end(build, ts_ns)
        for node in list(build.members):
            build.leave(node)
        if self._index.get(build.root.pid) is not build.root:
            _let_go(build.root)  # already pruned: nothing will look it up again

    def prune(self, now_ns: int) -> int:
        """Drop exited processes older than the grace period from the index; returns count."""
        dropped = 0
        while self._exited and now_ns - (self._exited[0].exited_ns or 0) > self._grace_ns:
            node = self._exited.popleft()
            if self._index.get(node.pid) is node:
                del self._index[node.pid]
                dropped += 1
            if node.build is not None and node.build.ended_ns is not None:
                _let_go(node)
        return dropped

    # -- seed and resync -------------------------------------------------------------------
    def resync(self, snapshot: Iterable[Snapshot], ts_ns: int) -> list[Effect]:
        """Reconcile with a full /proc listing after lost events or at start.

        Processes the tree missed are added under their current parent (the best lineage
        /proc still has); build membership follows the cgroup a process is in, which is the
        kernel's own record; a process gone from /proc is treated as exited. A cargo or build
        script found outside any build starts one, so a daemon started mid-build still
        watches it.
        """
        procs = {s.pid: s for s in snapshot}
        effects: list[Effect] = []
        for pid, node in list(self._index.items()):
            if node.exited_ns is None and pid not in procs:
                effects += self.on_exit(ProcExit(pid, ts_ns))
        for snap in _parents_first(procs):
            known = self._index.get(snap.pid)
            if known is not None and known.exited_ns is None:
                node = known
                record = self.kernel.exec_of(node.pid, node.started_ns) \
                    if self.kernel is not None and node.build is not None else None
                if record is not None:
                    # Its exec event may be among those lost: the kernel's record decides
                    # again (never upwards: the ceiling holds). No record: the process
                    # predates the daemon, and what it was found to be stands.
                    self._classify(node, snap.info, node.role, node.crate, record,
                                   exec_seen=True,
                                   prior_runner=node.parent.runner if node.parent else None)
            else:
                parent = self._index.get(snap.ppid)
                node = self._add(snap.pid, parent, ts_ns)
                node.info = snap.info
                if parent is not None and parent.build is not None:
                    self._enter(node, parent.build, parent)
            if snap.build_queue is not None and node.build is None:
                build = self.registry.by_queue(snap.build_queue)
                if build is not None:
                    self._enter(node, build, node.parent if node.parent
                                and node.parent.build is build else None)
            if node.build is None and self._starts(snap.pid, snap.info):
                effects += self._start(node, ts_ns, snap.info, descendants=True,
                                       kernel=self._mirror_start(snap.pid, snap.info))
        return effects

    # -- internals -------------------------------------------------------------------------
    def _starts(self, pid: int, info: ExecInfo) -> bool:
        """Whether a process found running outside builds is a build's start: by the file's
        identity with a kernel view (a real toolchain cargo), else by name."""
        if self.kernel is None:
            return starts_build(info)
        return self._mirror_start(pid, info) is not None

    def _mirror_start(self, pid: int, info: ExecInfo) -> KernelExec | None:
        return self.kernel.mirror(pid, info, None, in_build=False) \
            if self.kernel is not None else None

    def _add(self, pid: int, parent: Node | None, ts_ns: int) -> Node:
        node = Node(pid=pid, parent=parent, started_ns=ts_ns)
        self._index[pid] = node
        return node

    def _exec_info(self, node: Node, kernel: KernelExec | None) -> ExecInfo:
        """/proc's view of the program ``node`` just exec'd. A build-script runner's
        environment names the crate of the scripts it runs, so it must be the runner's: it
        is kept only when, after the read, the kernel's latest record for the pid is still
        the runner's exec (a runner that had already exec'd something else, perhaps its
        script, which may rewrite its own environment, gives none)."""
        info = _with_exe(self._read(node.pid, True), kernel)
        if kernel is None or kernel.runner is None or kernel.role != K_CARGO \
                or self.kernel is None:
            return info
        latest = self.kernel.exec_of(node.pid, node.started_ns)
        if latest is not None and latest.role == K_CARGO and latest.runner == kernel.runner:
            return info
        return dataclasses.replace(info, cargo_env=())

    def _classify(self, node: Node, info: ExecInfo, prior_role: Role | None,
                  prior_crate: Crate | None, kernel: KernelExec | None, *,
                  exec_seen: bool, ceiling: int | None = None,
                  prior_runner: Runner | None = None) -> None:
        """Set role, crate, basis and runner: by provenance with a kernel view, else by names.

        ``exec_seen``: the kernel saw this exec (``kernel`` is its record, or None when it
        kept none); otherwise the process predates the daemon and the kernel's decision is
        mirrored from the file's identity. ``prior_runner``: the runner the process was (as
        a runner's fork) right before the exec."""
        if self.kernel is None:
            node.role = classify(info, prior_role)
            node.crate = crate_of(info, node.role, prior_crate, prior_role)
            node.basis, node.runner = None, None
            return
        if ceiling is None:
            ceiling = node.ceiling
        if kernel is None and not exec_seen:
            kernel = self.kernel.exec_of(node.pid, node.started_ns) or self.kernel.mirror(
                node.pid, info, prior_role, in_build=True)
        build = node.build
        p: Provenance = capped(
            by_provenance(kernel, info, prior_role, prior_crate, prior_runner,
                          build.compiled_scripts if build is not None else None),
            ceiling, prior_role, prior_crate)
        node.role, node.crate, node.basis, node.ceiling = p.role, p.crate, p.basis, p.ceiling
        node.runner = p.runner
        if p.compiled is not None and build is not None:
            build.compiled(*p.compiled)

    def _enter(self, node: Node, build: Build, parent: Node | None,
               kernel: KernelExec | None = None) -> None:
        prior_role = parent.role if parent is not None else None
        prior_crate = parent.crate if parent is not None else None
        node.build = build
        info = node.info or ExecInfo(exe=None)
        self._classify(node, info, prior_role, prior_crate, kernel,
                       exec_seen=kernel is not None,
                       ceiling=parent.ceiling if parent is not None else K_CARGO,
                       prior_runner=parent.runner if parent is not None else None)
        build.members.add(node)
        build.processes_seen += 1

    def _start(self, node: Node, ts_ns: int, info: ExecInfo, *,
               descendants: bool = True, kernel: KernelExec | None = None) -> list[Effect]:
        node.info = info
        via = "cargo" if self.kernel is not None or not is_build_script(info) \
            else "build-script"
        build = self.registry.start(node, ts_ns=ts_ns, wall=self._wall(), via=via)
        build.root_exe = info.exe
        build.cwd = info.cwd
        build.announced = True
        self._enter(node, build, None, kernel)
        if node.runner is not None:
            build.via = "build-script-runner"
        if descendants:
            # Children forked between the exec and this event (and their own children) are
            # already in the tree: they belong to the build too. Parents first, so that each
            # inherits the role its parent has just been given.
            found = [(depth, other) for other in self._index.values()
                     if other.exited_ns is None and other.build is None
                     and (depth := _depth_below(other, node)) > 0]
            for _, other in sorted(found, key=lambda pair: pair[0]):
                self._enter(other, build, other.parent)
        return [BuildCreated(build), BuildAnnounced(build)]


def _with_exe(info: ExecInfo, kernel: KernelExec | None) -> ExecInfo:
    """``info``, with the path the kernel recorded for the exec when the process was gone
    before /proc could be read."""
    if info.exe is None and kernel is not None and kernel.filename:
        return dataclasses.replace(info, exe=kernel.filename)
    return info


def _let_go(node: Node) -> None:
    """Drop a gone process's link to its ended build.

    A build and its root point at each other; once both are out of use only Python's full
    (generation 2) collection would free the pair, which runs rarely, so each ended build's
    objects stayed until then: the daemon's memory grew with the number of builds (measured by
    bench/soak.py). Breaking the link frees them at once. Lineage keeps the node itself (pid,
    exe) for as long as a live descendant points at it.
    """
    node.build = None


def _parents_first(procs: dict[int, Snapshot]) -> list[Snapshot]:
    """Order a /proc listing so that every parent comes before its children."""
    ordered: list[Snapshot] = []
    done: set[int] = set()
    for pid in sorted(procs):
        stack = []
        cur: int | None = pid
        while cur is not None and cur in procs and cur not in done:
            stack.append(cur)
            done.add(cur)
            ppid = procs[cur].ppid
            cur = ppid if ppid != cur else None
        ordered.extend(procs[p] for p in reversed(stack))
    return ordered


def _depth_below(node: Node, ancestor: Node) -> int:
    """How many generations ``node`` is below ``ancestor``; 0 when it is not below it."""
    for depth, up in enumerate(node.ancestors(), start=1):
        if up is ancestor:
            return depth
    return 0
