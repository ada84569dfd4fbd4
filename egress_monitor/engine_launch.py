"""Containers started through an engine, made part of the requesting build.

Bookkeeping between three sources the daemon feeds in: engine requests (a member's connect
to an engine socket, or its exec of a container CLI: :meth:`LaunchWatch.request`), exits
(:meth:`exited`, which closes a requester's conversation), and container cgroups as they
appear and fill (``sources/cgroup_watch.py``: :meth:`change`). A container tied to a build
(``launches.tie``: exactly one build talking to an engine) has each of its processes handed
to ``enrol`` (the daemon writes the kernel member, the tree node, the namespace gate) at
first sight: when its cgroup fills, and again at every :meth:`tick` (a process forked before
its parent became a member is no member: the next read finds it).

No kernel here: reading ``cgroup.procs``, enrolling and alerting are injected.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from egress_monitor.builds import Build
from egress_monitor.containers import Container, container_of
from egress_monitor.launches import Request, Tie, expired, tie
from egress_monitor.sources.cgroup_watch import Appeared, Change, Gone, Populated

log = logging.getLogger(__name__)
MAX_REQUESTS = 1024


@dataclass(eq=False)
class Launched:
    """A container tied to ``build`` by ``request``: its processes are members."""

    rel: str
    container: Container
    build: Build
    request: Request
    appeared_ns: int
    pids: set[int] = field(default_factory=set)
    first_member_ns: int | None = None
    read_ns: int = 0  # when its cgroup.procs was last read (a fill began)

    def launched_by(self) -> dict[str, object]:
        """What events say about who asked for it."""
        return {"engine": self.request.engine, "pid": self.request.pid,
                "role": self.request.role, "crate": self.request.crate}


class LaunchWatch:
    """Engine requests in their windows, and the containers tied to builds."""

    def __init__(self, *, builds: Callable[[str], Build | None],
                 procs: Callable[[str], list[int]],
                 enrol: Callable[[int, Launched], bool],
                 untied: Callable[[str, Container, Tie], None],
                 watch: Callable[[str], None], forget: Callable[[str], None],
                 clock: Callable[[], int]) -> None:
        self._builds, self._procs, self._enrol = builds, procs, enrol
        self._untied, self._watch, self._forget, self._clock = untied, watch, forget, clock
        self.requests: list[Request] = []
        self.launched: dict[str, Launched] = {}  # by cgroup rel
        self.by_pid: dict[int, Launched] = {}
        self.counts = {"tied": 0, "ambiguous": 0, "none": 0}

    def request(self, req: Request) -> None:
        now = self._clock()
        self.requests = [r for r in self.requests if not expired(r, now)][-MAX_REQUESTS:]
        self.requests.append(req)

    def exited(self, pid: int, ts_ns: int) -> None:
        """A process exited: a conversation it held is closed (the grace runs from now).
        Called for every exit on the host: nothing is rebuilt unless the process held one."""
        if not any(r.pid == pid and r.ended_ns is None for r in self.requests):
            return
        self.requests = [dataclasses.replace(r, ended_ns=ts_ns)
                         if r.pid == pid and r.ended_ns is None else r for r in self.requests]

    def change(self, ch: Change) -> Launched | None:
        """One cgroup change; returns the container when it was tied just now."""
        if isinstance(ch, Appeared):
            return self._appeared(ch)
        found = self.launched.get(ch.rel)
        if found is None:
            return None
        if isinstance(ch, Populated):
            self._fill(found)
        elif isinstance(ch, Gone):
            self._drop(found)
        return None

    def _appeared(self, ch: Appeared) -> Launched | None:
        container = container_of(ch.rel)
        if container is None or ch.rel in self.launched:
            return None
        decided = tie(self.requests, ch.ts_ns)
        self.counts[decided.outcome] += 1
        build = self._builds(decided.request.build_id) if decided.request else None
        if decided.outcome == "ambiguous" or (decided.outcome == "tied" and build is None):
            log.warning("container %s (%s) appeared while builds %s talked to an engine: "
                        "tied to none", container.id, ch.rel, ", ".join(decided.candidates))
            self._untied(ch.rel, container, decided)
            return None
        if decided.request is None or build is None:
            return None  # nobody of ours asked
        found = Launched(ch.rel, container, build, decided.request, ch.ts_ns)
        self.launched[ch.rel] = found
        self._watch(ch.rel)
        log.info("container %s (%s) tied to build %s (asked by pid %d, %s)", container.id,
                 ch.rel, build.id, decided.request.pid, decided.request.engine)
        self._fill(found)  # a process may be in it already
        return found

    def _fill(self, found: Launched) -> None:
        if found.build.ended_ns is not None:
            self._drop(found)
            return
        # Twice: a process forked between the read and its parent's enrolment is found by
        # the second read (enrolled parents' later forks are the kernel's to follow).
        for _ in range(2):
            found.read_ns = self._clock()
            new = [p for p in self._procs(found.rel) if p not in found.pids]
            if not new:
                return
            for pid in new:
                found.pids.add(pid)
                if self._enrol(pid, found):
                    self.by_pid[pid] = found
                    if found.first_member_ns is None:
                        found.first_member_ns = self._clock()

    def _drop(self, found: Launched) -> None:
        self.launched.pop(found.rel, None)
        for pid in found.pids:
            if self.by_pid.get(pid) is found:
                del self.by_pid[pid]
        self._forget(found.rel)

    def tick(self) -> None:
        """Enrol what was missed; forget containers whose build ended."""
        for found in list(self.launched.values()):
            self._fill(found)

    def of_pid(self, pid: int) -> Launched | None:
        return self.by_pid.get(pid)
