"""LaunchWatch: requests, container cgroups, enrolment (engine_launch.py), no kernel."""

from __future__ import annotations

from egress_monitor.builds import Build, BuildRegistry
from egress_monitor.containers import Container
from egress_monitor.engine_launch import Launched, LaunchWatch
from egress_monitor.launches import Request, Tie
from egress_monitor.process_tree import Node
from egress_monitor.sources.cgroup_watch import Appeared, Gone, Populated

S = 1_000_000_000
ID = "cd" * 32
REL = f"/system.slice/docker-{ID}.scope"


class World:
    def __init__(self) -> None:
        self.registry = BuildRegistry(100, 8)
        self.builds = [self.registry.start(Node(pid=p, parent=None), ts_ns=0, wall=0.0,
                                           via="cargo") for p in (1, 2)]
        self.procs: dict[str, list[int]] = {}
        self.enrolled: list[tuple[int, str]] = []
        self.untied: list[tuple[str, Tie]] = []
        self.watched: list[str] = []
        self.now = 10 * S
        self.watch = LaunchWatch(
            builds=lambda i: next((b for b in self.builds if b.id == i), None),
            procs=lambda rel: self.procs.get(rel, []), enrol=self.enrol,
            untied=lambda rel, _c, t: self.untied.append((rel, t)),
            watch=self.watched.append, forget=lambda _rel: None, clock=lambda: self.now)

    def enrol(self, pid: int, launched: Launched) -> bool:
        self.enrolled.append((pid, launched.build.id))
        return True

    def ask(self, build: Build, pid: int, at: int) -> None:
        self.watch.request(Request(build.id, pid, "build-script", "evil", "docker", at))


def test_a_container_of_one_asking_build_is_tied_and_its_processes_enrolled() -> None:
    w = World()
    a = w.builds[0]
    w.ask(a, 50, 9 * S)
    launched = w.watch.change(Appeared(REL, 10 * S))
    assert launched is not None and launched.build is a
    assert launched.container == Container("docker", ID)
    assert w.watched == [REL] and w.enrolled == []
    w.procs[REL] = [70]
    w.watch.change(Populated(REL))
    assert w.enrolled == [(70, a.id)]
    w.procs[REL] = [70, 71]  # forked before its parent was a member: the tick finds it
    w.watch.tick()
    assert w.enrolled == [(70, a.id), (71, a.id)]
    assert w.watch.of_pid(71) is launched
    assert launched.launched_by() == {"engine": "docker", "pid": 50, "role": "build-script",
                                      "crate": "evil"}
    w.watch.change(Gone(REL))
    assert w.watch.of_pid(70) is None and REL not in w.watch.launched
    assert w.watch.counts["tied"] == 1


def test_two_asking_builds_tie_to_none() -> None:
    w = World()
    w.ask(w.builds[0], 50, 9 * S)
    w.ask(w.builds[1], 60, 9 * S)
    assert w.watch.change(Appeared(REL, 10 * S)) is None
    assert w.untied[0][1].outcome == "ambiguous"
    assert set(w.untied[0][1].candidates) == {b.id for b in w.builds}
    w.procs[REL] = [70]
    w.watch.change(Populated(REL))
    assert w.enrolled == [] and w.watch.counts["ambiguous"] == 1


def test_an_exit_closes_the_conversation_after_the_grace() -> None:
    w = World()
    w.ask(w.builds[0], 50, 1 * S)
    w.watch.exited(50, 2 * S)
    assert w.watch.change(Appeared(REL, 9 * S)) is None
    assert w.untied == [] and w.watch.counts["none"] == 1


def test_a_container_of_an_ended_build_is_dropped() -> None:
    w = World()
    a = w.builds[0]
    w.ask(a, 50, 9 * S)
    assert w.watch.change(Appeared(REL, 10 * S)) is not None
    w.registry.end(a, 11 * S)
    w.procs[REL] = [70]
    w.watch.tick()
    assert w.enrolled == [] and REL not in w.watch.launched
