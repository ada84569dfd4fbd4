"""The daemon's bookkeeping of namespace gates, with fake gates: one per namespace, opened at
first use, closed with the last build using it, none for the daemon's own namespace."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from egress_monitor.enforce.netns import NetnsGate
from egress_monitor.enforce.rules import BuildRule
from egress_monitor.netns_gates import NetnsGates

OWN = 4026531840


@dataclass
class FakeQueue:
    fd: int

    def fileno(self) -> int:
        return self.fd


@dataclass
class FakeGate:
    inode: int
    cookie: int
    queue: FakeQueue
    rules: list[list[BuildRule]] = field(default_factory=list)
    closes: int = 0
    refused: list[BuildRule] = field(default_factory=list)

    def sync(self, rules: list[BuildRule]) -> None:
        self.rules.append(rules)

    def close(self, refusing: Iterable[BuildRule] = ()) -> list[str]:
        self.closes += 1
        self.refused = list(refusing)
        return []


class World:
    """pid -> namespace inode; opening a path makes a fake gate (or fails when told)."""

    def __init__(self) -> None:
        self.ns_of: dict[int, int] = {}
        self.opened: list[FakeGate] = []
        self.fail: str | None = None

    def inode(self, pid: int, _root: str) -> int | None:
        return self.ns_of.get(pid)

    def open(self, path: str) -> NetnsGate:
        if self.fail:
            raise OSError(self.fail)
        pid = int(path.split("/")[2])
        gate = FakeGate(self.ns_of[pid], 1000 + self.ns_of[pid], FakeQueue(50 + len(self.opened)))
        self.opened.append(gate)
        return cast(NetnsGate, gate)


def make() -> tuple[World, NetnsGates]:
    world = World()
    return world, NetnsGates(OWN, world.open, inode=world.inode)


def test_own_namespace_and_gone_processes_get_no_gate() -> None:
    world, gates = make()
    world.ns_of[10] = OWN
    assert gates.use(10, "b1") is None and gates.use(11, "b1") is None
    assert world.opened == []


def test_one_gate_per_namespace_kept_until_its_last_build_ends() -> None:
    world, gates = make()
    world.ns_of.update({20: 7, 21: 7, 30: 8})
    g1 = gates.use(20, "b1")
    assert g1 is not None and gates.use(21, "b2") is g1  # same namespace, second build
    g2 = gates.use(30, "b2")
    assert g2 is not None and g2 is not g1 and len(world.opened) == 2
    assert gates.cookies() == {1007, 1008} and gates.of_cookie(1008) is g2
    assert set(gates.by_queue_fd) == {50, 51}
    assert gates.release("b1") == []  # b2 still uses both
    closed = gates.release("b2")
    assert {cast(Any, g).inode for g in closed} == {7, 8}
    assert all(g.closes == 1 for g in world.opened) and gates.by_inode == {}
    assert gates.by_queue_fd == {}


def test_rules_go_to_every_gate() -> None:
    world, gates = make()
    world.ns_of.update({20: 7, 30: 8})
    gates.use(20, "b1")
    gates.use(30, "b1")
    rules = [BuildRule("/egress-build-q3-x", 3)]
    assert gates.sync(rules) == []
    assert [g.rules for g in world.opened] == [[rules], [rules]]


def test_a_failed_open_is_retried_at_the_next_use() -> None:
    world, gates = make()
    world.ns_of[20] = 7
    world.fail = "no such namespace"
    assert gates.use(20, "b1") is None and gates.failed == {7: "no such namespace"}
    world.fail = None
    assert gates.use(20, "b1") is not None and gates.failed == {}


def test_close_all() -> None:
    world, gates = make()
    world.ns_of.update({20: 7, 30: 8})
    gates.use(20, "b1")
    gates.use(30, "b2")
    running = [BuildRule("/egress-build-q3-x", 3)]
    assert len(gates.close_all(running)) == 2 and gates.by_inode == {}
    assert all(g.refused == running for g in world.opened)  # left refusing, not open
