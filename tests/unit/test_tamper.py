"""Tamper decisions and the watch, on fakes: uid and ptrace events, cgroup escapes, packet
sockets, rules changed by a build, and the kill in enforce mode."""

from __future__ import annotations

import dataclasses
from typing import Any

from egress_monitor.builds import Build, BuildRegistry
from egress_monitor.events import ExecInfo, ProcPtrace, ProcUid
from egress_monitor.process_tree import Node
from egress_monitor.roles import Crate, Role
from egress_monitor.ruleguard import RuleTamper
from egress_monitor.sources.nfgen import Commit
from egress_monitor.tamper import TamperOps, TamperWatch, gained_root, named_by, outside

CG = "/runner/egress-build-q31000-abc-1"


def test_gaining_root() -> None:
    assert gained_root((1000, 1000), (1000, 0)) == "euid"  # a setuid-root exec
    assert gained_root((1000, 0), (0, 0)) == "uid"  # then setuid(0)
    assert gained_root((0, 0), (0, 0)) is None  # root from the start gains nothing
    assert gained_root((0, 0), (65534, 65534)) is None  # dropping is not gaining
    assert gained_root(None, (0, 0)) is None  # nothing known before
    assert gained_root((1000, 1000), (1000, 1000)) is None


def test_outside_the_build_cgroup() -> None:
    assert not outside(CG, CG) and not outside(CG + "/sub", CG)
    assert outside("/", CG) and outside("/runner", CG) and outside(CG + "-other", CG)
    assert not outside(None, CG)  # gone


def make_build() -> tuple[Build, Node, Node]:
    cargo = Node(pid=10, parent=None, info=ExecInfo(exe="/cargo", uid=0), role=Role.CARGO)
    build = BuildRegistry(31000, 2).start(cargo, ts_ns=0, wall=0.0, via="cargo")
    build.cgroup = CG
    script = Node(pid=11, parent=cargo, build=build, role=Role.BUILD_SCRIPT,
                  crate=Crate("evil-dep", "0.3.10"), info=ExecInfo(exe="/bs", uid=0))
    cargo.build = build
    build.members |= {cargo, script}
    return build, cargo, script


class Fake:
    def __init__(self, nodes: dict[int, Node]) -> None:
        self.nodes = nodes
        self.cgroups: dict[int, str] = {pid: CG for pid in nodes}
        self.sockets: dict[int, set[int]] = {}
        self.packets: set[int] | None = set()
        self.moved: list[tuple[str, int]] = []
        self.killed_cgroups: list[str] = []
        self.killed: list[int] = []
        self.alerts: list[dict[str, Any]] = []

    def move(self, cgroup: str, pid: int) -> bool:
        self.moved.append((cgroup, pid))
        return True

    def ops(self) -> TamperOps:
        return TamperOps(cgroup_of=self.cgroups.get,
                         socket_inodes=lambda pid: self.sockets.get(pid, set()),
                         move=self.move,
                         kill_cgroup=self.killed_cgroups.append, kill_pid=self.killed.append,
                         packet_inodes=lambda: self.packets)


def watch(fake: Fake, build: Build, enforce: bool) -> TamperWatch:
    w = TamperWatch(node_of=fake.nodes.get, builds=lambda: [build],
                    emit=lambda a: fake.alerts.append(a.record()), wall=lambda: 0.0,
                    enforce=lambda: enforce)
    w.ops = fake.ops()
    return w


def test_uid_0_from_an_unprivileged_member() -> None:
    build, cargo, script = make_build()
    child = Node(pid=12, parent=script, build=build, role=Role.BUILD_SCRIPT,
                 crate=script.crate, info=script.info)
    build.members.add(child)
    fake = Fake({10: cargo, 11: script, 12: child})
    w = watch(fake, build, enforce=False)
    w.on_uid(ProcUid(12, 65534, 65534, 1))  # setpriv drops to nobody: nothing
    w.on_uid(ProcUid(12, 65534, 0, 2))  # exec of a setuid-root copy
    w.on_uid(ProcUid(12, 0, 0, 3))  # os.setuid(0): the same process, alerted once
    w.on_uid(ProcUid(11, 0, 0, 4))  # the root build script: root all along
    [alert] = fake.alerts
    assert alert["kind"] == "tamper" and alert["evidence"]["tamper"] == "uid_0"
    assert alert["evidence"]["gained"] == "euid"
    assert alert["evidence"]["before"] == {"ruid": 65534, "euid": 65534}
    assert alert["crate"] == {"name": "evil-dep", "version": "0.3.10"}
    assert alert["build"]["id"] == build.id and alert["blocked"] is False
    assert not fake.killed_cgroups  # audit


def test_ptrace_by_a_member_kills_in_enforce() -> None:
    build, cargo, script = make_build()
    fake = Fake({10: cargo, 11: script})
    fake.cgroups[10] = "/runner"  # cargo moved itself out too: SIGKILLed by pid
    w = watch(fake, build, enforce=True)
    w.on_ptrace(ProcPtrace(tracer=11, target=10, ts_ns=1))
    w.on_ptrace(ProcPtrace(tracer=99, target=11, ts_ns=2))  # not a member's doing
    [alert] = fake.alerts
    assert alert["evidence"]["tamper"] == "ptrace" and alert["evidence"]["target_in_build"]
    assert alert["evidence"]["build_killed"] is True and alert["blocked"] is True
    assert fake.killed_cgroups == [CG] and fake.killed == [10]
    assert build.killed_by == "tamper"


def test_a_member_outside_its_cgroup_is_moved_back_once() -> None:
    build, cargo, script = make_build()
    fake = Fake({10: cargo, 11: script})
    fake.cgroups[11] = "/"
    w = watch(fake, build, enforce=False)
    w.check()
    w.check()  # still out (the fake does not move it): no second alert
    assert fake.moved == [(CG, 11), (CG, 11)]
    [alert] = fake.alerts
    assert alert["evidence"] == {"tamper": "cgroup", "cgroup": "/", "build_cgroup": CG,
                                 "moved_back": True, "build_killed": False}
    assert alert["process"]["pid"] == 11


def test_new_packet_sockets_are_looked_for_in_members_only() -> None:
    build, cargo, script = make_build()
    fake = Fake({10: cargo, 11: script})
    fake.packets = {5}  # someone else's, seen at the first check
    w = watch(fake, build, enforce=False)
    w.check()
    fake.packets = {5, 77}
    fake.sockets = {11: {3, 77}}
    w.check()
    w.check()  # not new any more
    [alert] = fake.alerts
    assert alert["evidence"]["tamper"] == "packet_socket"
    assert alert["evidence"]["inodes"] == [77] and alert["process"]["pid"] == 11


def test_packet_sockets_unreadable_is_no_alert() -> None:
    build, cargo, script = make_build()
    fake = Fake({10: cargo, 11: script})
    fake.packets = None
    w = watch(fake, build, enforce=False)
    w.check()
    assert fake.alerts == []


class FakeGuard:
    detector = "nftables-generation"

    def __init__(self, found: RuleTamper | None) -> None:
        self.found = found

    def check(self) -> RuleTamper | None:
        found, self.found = self.found, None
        return found


def test_rules_changed_by_a_member_name_its_build_and_crate() -> None:
    build, cargo, script = make_build()
    # A short-lived iptables of the build script: its exec was never read, so no crate.
    iptables = Node(pid=13, parent=script, build=build, role=Role.OTHER)
    fake = Fake({10: cargo, 11: script, 13: iptables})
    w = watch(fake, build, enforce=True)
    w.rules = FakeGuard(RuleTamper(("ipv4 nat: jump removed from OUTPUT: x",),
                                   (Commit(5, 13, "iptables"),), True))  # type: ignore[assignment]
    w.check()
    [alert] = fake.alerts
    assert alert["process"]["pid"] == 13
    assert alert["crate"] == {"name": "evil-dep", "version": "0.3.10"}
    assert alert["role"] == "build-script"
    ev = alert["evidence"]
    assert ev["differences"] == ["ipv4 nat: jump removed from OUTPUT: x"] and ev["restored"]
    assert ev["committed_by"] == [{"pid": 13, "comm": "iptables"}] and ev["build_killed"]
    assert named_by(script) is script


def test_rules_changed_by_no_member_still_alert_without_a_build() -> None:
    build, cargo, script = make_build()
    fake = Fake({10: cargo, 11: script})
    w = watch(fake, build, enforce=True)
    w.rules = FakeGuard(RuleTamper(("ipv4 filter: chain EGRESS-MON flushed",),
                                   (Commit(9, 4242, "nft"),), True))  # type: ignore[assignment]
    w.check()
    [alert] = fake.alerts
    assert alert["build"] is None and alert["process"] == {"pid": 4242, "exe": None,
                                                           "comm": "nft"}
    assert alert["evidence"]["build_killed"] is False and not fake.killed_cgroups


def test_a_detached_bpf_program_is_an_alert_once() -> None:
    build, cargo, script = make_build()
    fake = Fake({10: cargo, 11: script})
    problems: list[str] = []
    w = watch(fake, build, enforce=True)
    w.ops = dataclasses.replace(fake.ops(), bpf_intact=lambda: list(problems))
    w.check()
    problems.append("em_backstop was detached from /sys/fs/cgroup")
    w.check()
    w.check()  # the same problem: no second alert
    [alert] = fake.alerts
    assert alert["evidence"] == {"tamper": "bpf", "build_killed": False,
                                 "problems": ["em_backstop was detached from /sys/fs/cgroup"]}
    assert alert["build"] is None and not fake.killed_cgroups
