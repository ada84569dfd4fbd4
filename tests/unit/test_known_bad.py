"""Known-bad crates at every exec that compiles or runs one, once per build and role."""

from __future__ import annotations

from egress_monitor.builds import BuildRegistry
from egress_monitor.events import ExecInfo
from egress_monitor.iocs import parse_iocs
from egress_monitor.known_bad import KnownBadWatch
from egress_monitor.process_tree import Node
from egress_monitor.roles import Crate, Role

IOCS = parse_iocs("version: 1\ncrates:\n  - {name: proc-macro1, versions: '*', why: macro}\n"
                  "  - {name: arrayref, versions: '=0.3.10', why: release}\n", "i.yaml")


def build_of(registry: BuildRegistry, pid: int = 1) -> Node:
    cargo = Node(pid=pid, parent=None, info=ExecInfo(exe="/usr/bin/cargo"), role=Role.CARGO)
    cargo.build = registry.start(cargo, ts_ns=0, wall=0.0, via="cargo")
    return cargo


def child(parent: Node, pid: int, role: Role, crate: Crate | None) -> Node:
    return Node(pid=pid, parent=parent, build=parent.build, role=role, crate=crate,
                info=ExecInfo(exe=f"/x/{pid}"))


def test_compile_build_script_and_run_each_alert_once_and_children_do_not() -> None:
    registry = BuildRegistry(31000, 4)
    cargo = build_of(registry)
    watch = KnownBadWatch(IOCS)
    macro = Crate("proc-macro1", "0.1.1")
    rustc = child(cargo, 2, Role.RUSTC, macro)
    assert watch.check(rustc) is not None
    assert watch.check(child(cargo, 3, Role.RUSTC, macro)) is None  # once per build and role
    assert watch.check(child(rustc, 4, Role.RUSTC, macro)) is None  # rustc's linker
    script = child(cargo, 5, Role.BUILD_SCRIPT, Crate("proc_macro1", "0.1.1"))
    assert watch.check(script) is not None
    assert watch.check(child(script, 6, Role.BUILD_SCRIPT, script.crate)) is None  # its sh
    assert watch.check(child(cargo, 7, Role.CRATE_BINARY, Crate("arrayref", "0.3.10")))
    assert watch.check(child(cargo, 8, Role.CRATE_BINARY, Crate("arrayref", "0.3.9"))) is None
    assert watch.check(child(cargo, 9, Role.OTHER, macro)) is None
    assert watch.check(child(cargo, 10, Role.RUSTC, None)) is None
    other = build_of(registry, 100)
    assert watch.check(child(other, 11, Role.RUSTC, macro)) is not None  # another build
