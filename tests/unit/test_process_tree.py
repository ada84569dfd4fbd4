"""The process tree, from a recorded real `cargo run` and from synthetic sequences."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from egress_monitor.builds import BuildRegistry
from egress_monitor.events import ExecInfo, ProcExec, ProcExit, ProcFork
from egress_monitor.process_tree import (
    BuildAnnounced,
    BuildCreated,
    Effect,
    Joined,
    MaybeEnded,
    Node,
    ProcessTree,
    Snapshot,
)
from egress_monitor.roles import Crate, Role

FIXTURE = Path(__file__).parents[1] / "fixtures" / "cargo_run.jsonl"
CARGO = "/root/.rustup/toolchains/stable/bin/cargo"


class FakeProc:
    """What /proc would say: an ExecInfo per pid, set as the sequence goes."""

    def __init__(self) -> None:
        self.infos: dict[int, ExecInfo] = {}
        self.reads: list[tuple[int, bool]] = []

    def read(self, pid: int, full: bool) -> ExecInfo:
        self.reads.append((pid, full))
        info = self.infos.get(pid, ExecInfo(exe=None))
        return info if full else ExecInfo(exe=info.exe, argv=info.argv)


def make_tree(grace_ns: int = 1_000) -> tuple[ProcessTree, FakeProc]:
    proc = FakeProc()
    tree = ProcessTree(BuildRegistry(100, 4), proc.read, clock_wall=lambda: 1_700_000_000.0,
                       grace_ns=grace_ns)
    return tree, proc


def info(exe: str, *argv: str, **env: str) -> ExecInfo:
    return ExecInfo(exe=exe, argv=argv or (exe,), cwd="/src", uid=1000,
                    cargo_env=tuple(sorted(env.items())))


def exe_names(nodes: list[Node]) -> list[str]:
    return [(n.exe or "?").rsplit("/", 1)[-1] for n in nodes]


# -- replay of a real recording ------------------------------------------------------------

def replay(path: Path) -> tuple[ProcessTree, list[Effect], dict[int, list[Node]]]:
    tree, proc = make_tree(grace_ns=10**15)
    effects: list[Effect] = []
    seen: dict[int, list[Node]] = {}
    for line in path.read_text().splitlines():
        rec: dict[str, Any] = json.loads(line)
        if rec["ev"] == "fork":
            effects += tree.on_fork(ProcFork(rec["parent"], rec["child"], rec["ts"]))
        elif rec["ev"] == "exec":
            raw = rec["info"]
            proc.infos[rec["pid"]] = ExecInfo(
                exe=raw["exe"], argv=tuple(raw["argv"]), cwd=raw["cwd"], uid=raw["uid"],
                cargo_env=tuple((k, v) for k, v in raw["cargo_env"]))
            effects += tree.on_exec(ProcExec(rec["pid"], rec["ts"]))
            node = tree.get(rec["pid"])
            assert node is not None
            # Snapshot role and crate as they stood after this exec.
            seen.setdefault(rec["pid"], []).append(
                Node(pid=node.pid, parent=node.parent, build=node.build, role=node.role,
                     crate=node.crate, info=node.info))
        elif rec["ev"] == "exit":
            effects += tree.on_exit(ProcExit(rec["pid"], rec["ts"]))
    return tree, effects, seen


def test_recorded_cargo_run_roles_crates_and_lineage() -> None:
    tree, effects, seen = replay(FIXTURE)
    created = [e for e in effects if isinstance(e, BuildCreated)]
    assert len(created) == 1
    build = created[0].build
    # The build starts at rustup's proxy, the very first exec.
    assert build.root.info is not None and build.via == "cargo"
    first_exec = next(iter(seen.values()))[0]
    assert build.root.pid == first_exec.pid and first_exec.exe == "/root/.cargo/bin/rustup"

    by_program: dict[str, list[Node]] = {}
    for snapshots in seen.values():
        for snap in snapshots:
            by_program.setdefault((snap.exe or "?").rsplit("/", 1)[-1], []).append(snap)

    assert {n.role for n in by_program["rustc"]} == {Role.RUSTC}
    assert Crate("evil-dep", "0.3.10") in {n.crate for n in by_program["rustc"]}
    assert Crate("app", "1.0.0") in {n.crate for n in by_program["rustc"]}
    # The linker that rustc runs is rustc's work.
    assert {n.role for n in by_program["x86_64-linux-gnu-gcc-12"]} == {Role.RUSTC}
    [script] = by_program["build-script-build"]
    assert script.role is Role.BUILD_SCRIPT and script.crate == Crate("evil-dep", "0.3.10")
    [child] = by_program["dash"]
    assert child.role is Role.BUILD_SCRIPT and child.crate == Crate("evil-dep", "0.3.10")
    assert exe_names(ProcessTree.lineage(tree.get(child.pid) or child)) == \
        ["app", "build-script-build", "dash"]  # the root's latest program is the app
    # `cargo run` execs the binary in cargo's own process.
    [app] = by_program["app"]
    assert app.pid == build.root.pid
    assert app.role is Role.CRATE_BINARY and app.crate == Crate("app", "1.0.0")

    assert isinstance(effects[-1], MaybeEnded) and effects[-1].build is build
    assert not build.members
    forks = [ln for ln in FIXTURE.read_text().splitlines() if '"ev": "fork"' in ln]
    assert build.processes_seen == len(forks)  # the root's own fork included


# -- synthetic sequences -------------------------------------------------------------------

def start_cargo(tree: ProcessTree, proc: FakeProc, pid: int = 10) -> list[Effect]:
    tree.on_fork(ProcFork(1, pid, 1))
    proc.infos[pid] = info(CARGO, "cargo", "build")
    return tree.on_exec(ProcExec(pid, 2))


def test_process_outside_builds_costs_one_cheap_read() -> None:
    tree, proc = make_tree()
    tree.on_fork(ProcFork(1, 5, 1))
    proc.infos[5] = info("/usr/bin/make", "make")
    assert tree.on_exec(ProcExec(5, 2)) == []
    assert proc.reads == [(5, False)]
    node = tree.get(5)
    assert node is not None and node.build is None and node.role is None


def test_cargo_starts_a_build_and_children_join_it() -> None:
    tree, proc = make_tree()
    effects = start_cargo(tree, proc)
    assert [type(e) for e in effects] == [BuildCreated, BuildAnnounced]
    build = effects[0].build
    joined = tree.on_fork(ProcFork(10, 11, 3))
    assert joined == [Joined(tree.get(11), build)]  # type: ignore[arg-type]
    assert build.root_exe == CARGO and build.cwd == "/src"


def test_double_fork_keeps_lineage_after_parents_exit() -> None:
    tree, proc = make_tree(grace_ns=10)
    start_cargo(tree, proc)
    tree.on_fork(ProcFork(10, 20, 3))
    proc.infos[20] = info("/t/debug/build/foo-0123456789abcdef/build-script-build",
                          CARGO_PKG_NAME="foo", CARGO_PKG_VERSION="1.2.3")
    tree.on_exec(ProcExec(20, 4))
    tree.on_fork(ProcFork(20, 21, 5))  # sh
    tree.on_fork(ProcFork(21, 22, 6))  # sh's child, which calls setsid and is orphaned
    for pid, ts in ((21, 7), (20, 8), (10, 9)):
        tree.on_exit(ProcExit(pid, ts))
    proc.infos[22] = info("/usr/bin/curl", "curl", "-d", "x")
    tree.on_exec(ProcExec(22, 10))
    tree.prune(10_000)  # the exited ancestors leave the index ...
    assert tree.get(10) is None and tree.get(20) is None
    node = tree.get(22)
    assert node is not None
    # ... but stay reachable from their live descendant.
    assert [n.pid for n in ProcessTree.lineage(node)] == [10, 20, 21, 22]
    assert node.role is Role.BUILD_SCRIPT and node.crate == Crate("foo", "1.2.3")
    assert node.build is not None and node.build.members == {node}


def test_build_script_role_is_sticky_through_rustc_and_exec() -> None:
    tree, proc = make_tree()
    start_cargo(tree, proc)
    tree.on_fork(ProcFork(10, 20, 3))
    proc.infos[20] = info("/t/build/bar-0123456789abcdef/build-script-main")
    tree.on_exec(ProcExec(20, 4))
    node = tree.get(20)
    assert node is not None and node.crate == Crate("bar", None)  # from its build dir
    # An autocfg-style probe: the build script runs rustc.
    tree.on_fork(ProcFork(20, 21, 5))
    proc.infos[21] = info("/usr/bin/rustc", "rustc", "--crate-name", "probe")
    tree.on_exec(ProcExec(21, 6))
    probe = tree.get(21)
    assert probe is not None and probe.role is Role.BUILD_SCRIPT
    assert probe.crate == Crate("bar", None)
    # The build script execs something else in place: still the build script's code.
    proc.infos[20] = info("/bin/sh", "sh", "-c", "curl ...")
    tree.on_exec(ProcExec(20, 7))
    assert node.role is Role.BUILD_SCRIPT


def test_build_script_outside_cargo_starts_a_build() -> None:
    tree, proc = make_tree()
    tree.on_fork(ProcFork(1, 30, 1))
    proc.infos[30] = info("/bazel/out/build-script-build", CARGO_PKG_NAME="ring")
    effects = tree.on_exec(ProcExec(30, 2))
    build = effects[0].build
    assert build.via == "build-script"
    assert build.root.role is Role.BUILD_SCRIPT and build.root.crate == Crate("ring", None)


def test_cargo_inside_a_build_does_not_start_another() -> None:
    tree, proc = make_tree()
    start_cargo(tree, proc)
    tree.on_fork(ProcFork(10, 40, 3))
    proc.infos[40] = info(CARGO, "cargo", "metadata")
    assert tree.on_exec(ProcExec(40, 4)) == []
    assert len(tree.registry.active()) == 1


def test_crate_binary_from_cargo_test() -> None:
    tree, proc = make_tree()
    start_cargo(tree, proc)
    tree.on_fork(ProcFork(10, 50, 3))
    proc.infos[50] = info("/w/target/debug/deps/mylib-0123456789abcdef",
                          CARGO_PKG_NAME="mylib", CARGO_PKG_VERSION="0.1.0")
    tree.on_exec(ProcExec(50, 4))
    node = tree.get(50)
    assert node is not None and node.role is Role.CRATE_BINARY
    assert node.crate == Crate("mylib", "0.1.0")
    # git under cargo (fetching) is cargo's work.
    tree.on_fork(ProcFork(10, 51, 5))
    proc.infos[51] = info("/usr/bin/git", "git", "fetch")
    tree.on_exec(ProcExec(51, 6))
    git = tree.get(51)
    assert git is not None and git.role is Role.CARGO and git.crate is None


def test_pid_reuse_does_not_confuse_lineage() -> None:
    tree, proc = make_tree()
    start_cargo(tree, proc)
    tree.on_fork(ProcFork(10, 60, 3))
    old = tree.get(60)
    tree.on_fork(ProcFork(60, 61, 4))
    tree.on_exit(ProcExit(60, 5))
    # pid 60 comes back as an unrelated process outside the build.
    tree.on_fork(ProcFork(1, 60, 6))
    new = tree.get(60)
    assert new is not old and new is not None and new.build is None
    child = tree.get(61)
    assert child is not None and child.parent is old


def test_last_exit_asks_for_end_and_exits_are_idempotent() -> None:
    tree, proc = make_tree()
    build = start_cargo(tree, proc)[0].build
    tree.on_fork(ProcFork(10, 11, 3))
    assert tree.on_exit(ProcExit(10, 4)) == []
    assert tree.on_exit(ProcExit(11, 5)) == [MaybeEnded(build)]
    assert tree.on_exit(ProcExit(11, 5)) == []
    tree.end_build(build, 6)
    assert tree.registry.active() == [] and build.ended_ns == 6
    # A straggler forked from an ended build's process does not rejoin it.
    assert tree.on_fork(ProcFork(11, 12, 7)) == []


def test_adopt_waits_for_the_roots_exec_to_announce() -> None:
    tree, proc = make_tree()
    tree.on_fork(ProcFork(1, 70, 1))
    build, effects = tree.adopt(70, 1, 2, info("/usr/bin/python3", "egress-monitor", "exec"))
    assert [type(e) for e in effects] == [BuildCreated]
    assert build.via == "exec" and not build.announced
    proc.infos[70] = info("/usr/bin/make", "make", "-j2")
    assert tree.on_exec(ProcExec(70, 3)) == [BuildAnnounced(build)]
    assert build.root_exe == "/usr/bin/make"
    again, effects = tree.adopt(70, 1, 4, info("/usr/bin/make"))
    assert again is build and effects == []


def test_resync_adds_missed_processes_and_follows_cgroups() -> None:
    tree, proc = make_tree()
    build = start_cargo(tree, proc)[0].build
    tree.on_fork(ProcFork(1, 80, 3))  # will vanish while events were lost
    effects = tree.resync([
        Snapshot(1, 0, info("/sbin/init")),
        Snapshot(10, 1, info(CARGO, "cargo"), build_queue=build.queue),
        Snapshot(11, 10, info("/usr/bin/rustc", "rustc"), build_queue=build.queue),
        # Reparented to init, but its cgroup says it is the build's.
        Snapshot(12, 1, info("/usr/bin/curl", "curl"), build_queue=build.queue),
        # A cargo running outside any build: it becomes one, with its child.
        Snapshot(90, 1, info(CARGO, "cargo", "test")),
        Snapshot(91, 90, info("/usr/bin/rustc", "rustc")),
    ], ts_ns=100)
    assert tree.get(80) is not None and tree.get(80).exited_ns == 100  # type: ignore[union-attr]
    assert {n.pid for n in build.members} == {10, 11, 12}
    new = [e.build for e in effects if isinstance(e, BuildCreated)]
    assert len(new) == 1 and new[0].root.pid == 90
    assert {n.pid for n in new[0].members} == {90, 91}
    rustc = tree.get(91)
    assert rustc is not None and rustc.role is Role.RUSTC


def test_cargo_found_with_children_already_forked() -> None:
    tree, proc = make_tree()
    tree.on_fork(ProcFork(1, 10, 1))
    tree.on_fork(ProcFork(10, 11, 2))  # forked between the exec and our reading of it
    tree.on_fork(ProcFork(11, 12, 3))
    proc.infos[10] = info(CARGO, "cargo")
    effects = tree.on_exec(ProcExec(10, 4))
    build = effects[0].build
    assert {n.pid for n in build.members} == {10, 11, 12}
    assert all(n.role is Role.CARGO for n in build.members)


def test_queue_slots_are_bounded_and_reused() -> None:
    registry = BuildRegistry(100, 2)
    a = registry.start(Node(1, None), ts_ns=0, wall=0.0, via="cargo")
    b = registry.start(Node(2, None), ts_ns=0, wall=0.0, via="cargo")
    assert {a.queue, b.queue} == {100, 101}
    from egress_monitor.builds import NoQueueSlot
    with pytest.raises(NoQueueSlot):
        registry.start(Node(3, None), ts_ns=0, wall=0.0, via="cargo")
    registry.end(a, 1)
    c = registry.start(Node(4, None), ts_ns=0, wall=0.0, via="cargo")
    assert c.queue == a.queue and registry.by_queue(c.queue) is c
    with pytest.raises(ValueError):
        BuildRegistry(65535, 10)


def test_ended_builds_are_freed_without_waiting_for_a_full_collection() -> None:
    """No per-build retention: after a build ends and its processes leave the index, nothing
    of it is left for the cyclic collector (which runs rarely) to find."""
    import gc

    def garbage_after(builds: int) -> int:
        tree, proc = make_tree(grace_ns=10)
        gc.collect()
        gc.disable()
        try:
            ts = 100
            for i in range(builds):
                pid = 1000 + i
                proc.infos[pid] = info(CARGO, "cargo", "build")
                tree.on_fork(ProcFork(1, pid, ts))
                effects = tree.on_exec(ProcExec(pid, ts + 1))
                [build] = [e.build for e in effects if isinstance(e, BuildCreated)]
                tree.on_exit(ProcExit(pid, ts + 2))
                tree.end_build(build, ts + 3)
                ts += 100
                tree.prune(ts)
            del effects, build
            return gc.collect()
        finally:
            gc.enable()

    assert garbage_after(200) == garbage_after(10)


# -- with the kernel's view (roles by provenance) -----------------------------------------

class FakeKernel:
    """The kernel's exec records by pid, and the kinds of files by pid (for the mirror)."""

    def __init__(self) -> None:
        from egress_monitor.provenance import KernelExec
        self.records: dict[int, KernelExec] = {}
        self.latest: dict[int, KernelExec] = {}  # a later plain record than records' (re-exec)
        self.kinds: dict[int, int] = {}
        self.paths: dict[int, str] = {}

    def exec_of(self, pid: int, since_ns: int, transition: bool = False) -> Any:
        if not transition and pid in self.latest:
            return self.latest[pid]
        return self.records.get(pid)

    def mirror(self, pid: int, info: ExecInfo, before: Role | None, in_build: bool) -> Any:
        from egress_monitor.provenance import mirror
        return mirror(self.kinds.get(pid, 0), before, in_build, self.paths.get(pid))


BS = "/w/target/debug/build/evil-0123456789abcdef/build-script-build"


def test_kernel_view_starts_builds_by_the_kernels_word_and_roles_by_provenance() -> None:
    from egress_monitor.provenance import K_CARGO, K_CRATE, K_NONE, KernelExec
    tree, proc = make_tree()
    kernel = FakeKernel()
    tree.kernel = kernel
    # a program named cargo the kernel did not start a build for: nothing
    proc.infos[10] = info("/tmp/cargo")
    assert tree.on_exec(ProcExec(10, 1)) == []
    # the real one
    proc.infos[20] = info(CARGO, "cargo", "build")
    kernel.records[20] = KernelExec(K_CARGO, K_NONE, True, CARGO)
    effects = tree.on_exec(ProcExec(20, 2))
    assert any(isinstance(e, BuildCreated) for e in effects)
    tree.on_fork(ProcFork(20, 21, 3))
    # the build script's exec event is lost; a resync finds it and asks the kernel
    proc.infos[21] = info(BS, CARGO_PKG_NAME="evil", CARGO_PKG_VERSION="0.3.10")
    kernel.records[21] = KernelExec(K_CRATE, K_CARGO, False, BS)
    node = tree.get(21)
    assert node is not None and node.role is Role.CARGO  # inherited at fork
    tree.resync([Snapshot(20, 1, proc.infos[20]), Snapshot(21, 20, proc.infos[21])], 4)
    assert (node.role, node.crate) == (Role.BUILD_SCRIPT, Crate("evil", "0.3.10"))
    # it runs the real cargo, which the kernel (with its membership lost) calls a start:
    # crate code stays crate code
    proc.infos[21] = info(CARGO, "cargo", "fetch")
    kernel.records[21] = KernelExec(K_CARGO, K_NONE, True, CARGO)
    tree.on_exec(ProcExec(21, 5))
    assert (node.role, node.crate) == (Role.BUILD_SCRIPT, Crate("evil", "0.3.10"))
    tree.on_fork(ProcFork(21, 22, 6))
    child = tree.get(22)
    assert child is not None and child.role is Role.BUILD_SCRIPT


def test_attach_makes_an_outside_process_a_member_held_to_crate_code() -> None:
    """A container an engine started for the build (engine_launch.py): its process joins the
    build with the requester's role and crate; its forks follow."""
    tree, _proc = make_tree()
    root = Node(pid=1, parent=None)
    build = tree.registry.start(root, ts_ns=0, wall=0.0, via="cargo")
    tree.on_fork(ProcFork(parent=500, child=600, ts_ns=1))  # the engine's child
    node = tree.attach(600, build, Role.BUILD_SCRIPT, Crate("evil"), 2, info("/bin/sh"),
                       basis="container x")
    assert node is not None and node.build is build and node.crate == Crate("evil")
    assert node in build.members and node.role is Role.BUILD_SCRIPT
    assert tree.attach(600, build, Role.OTHER, None, 3, info("/bin/sh"), basis="") is None
    effects = tree.on_fork(ProcFork(parent=600, child=601, ts_ns=4))
    assert tree.get(601) is not None and tree.get(601).build is build  # type: ignore[union-attr]
    assert len(effects) == 1


RUNNER = "/bazel/out/bin/cargo_build_script_runner/runner"
SCRIPT = "/bazel/out/bin/external/ring/ring_bs_build_script_"


def test_a_runner_starts_a_build_and_what_it_runs_is_its_crates_build_script() -> None:
    """The build system starts the runner with the crate's CARGO_PKG_*; the runner's child
    execs the script, whose own environment names another crate: the runner's stands, and
    so it does for what the script runs."""
    from egress_monitor.provenance import K_CARGO, K_CRATE, K_NONE, KernelExec
    tree, proc = make_tree()
    kernel = FakeKernel()
    tree.kernel = kernel
    proc.infos[30] = info(RUNNER, CARGO_PKG_NAME="ring", CARGO_PKG_VERSION="0.17.8")
    kernel.records[30] = KernelExec(K_CARGO, K_NONE, True, RUNNER, RUNNER)
    effects = tree.on_exec(ProcExec(30, 1))
    assert any(isinstance(e, BuildCreated) for e in effects)
    runner = tree.get(30)
    assert runner is not None and runner.role is Role.CARGO and runner.crate is None
    assert runner.basis == f"kernel: configured build-script runner {RUNNER}"
    assert runner.build is not None and runner.build.via == "build-script-runner"
    tree.on_fork(ProcFork(30, 31, 2))
    proc.infos[31] = info(SCRIPT, CARGO_PKG_NAME="victim", CARGO_PKG_VERSION="1.0.0")
    kernel.records[31] = KernelExec(K_CRATE, K_CARGO, False, SCRIPT)
    tree.on_exec(ProcExec(31, 3))
    script = tree.get(31)
    assert script is not None and script.runner is None
    assert (script.role, script.crate) == (Role.BUILD_SCRIPT, Crate("ring", "0.17.8"))
    assert script.basis is not None and RUNNER in script.basis
    tree.on_fork(ProcFork(31, 32, 4))
    proc.infos[32] = info("/usr/bin/curl", CARGO_PKG_NAME="victim")
    kernel.records[32] = KernelExec(K_CRATE, K_CRATE, False, "/usr/bin/curl")
    tree.on_exec(ProcExec(32, 5))
    child = tree.get(32)
    assert child is not None
    assert (child.role, child.crate) == (Role.BUILD_SCRIPT, Crate("ring", "0.17.8"))
    # the same pids through a resync (lost events): the same answers
    tree.resync([Snapshot(30, 1, proc.infos[30]), Snapshot(31, 30, proc.infos[31]),
                 Snapshot(32, 31, proc.infos[32])], 6)
    assert (script.role, script.crate) == (Role.BUILD_SCRIPT, Crate("ring", "0.17.8"))
    # a plain cargo's child with the same file is a crate binary: cargo is no runner
    proc.infos[40] = info(CARGO, "cargo", "build")
    kernel.records[40] = KernelExec(K_CARGO, K_NONE, True, CARGO)
    tree.on_exec(ProcExec(40, 7))
    tree.on_fork(ProcFork(40, 41, 8))
    proc.infos[41] = info(SCRIPT, CARGO_PKG_NAME="victim")
    kernel.records[41] = KernelExec(K_CRATE, K_CARGO, False, SCRIPT)
    tree.on_exec(ProcExec(41, 9))
    assert tree.get(41).role is Role.CRATE_BINARY  # type: ignore[union-attr]


def test_a_runners_environment_read_after_it_exec_d_on_is_not_its_own() -> None:
    """A runner that exec'd its script in place before the daemon read /proc: the environ
    read is the script's, so it names no crate; the script is a build script of none."""
    from egress_monitor.provenance import K_CARGO, K_CRATE, K_NONE, KernelExec
    tree, proc = make_tree()
    kernel = FakeKernel()
    tree.kernel = kernel
    proc.infos[50] = info(SCRIPT, CARGO_PKG_NAME="victim", CARGO_PKG_VERSION="1.0.0")
    kernel.records[50] = KernelExec(K_CARGO, K_NONE, True, RUNNER, RUNNER)
    kernel.latest[50] = KernelExec(K_CRATE, K_CARGO, False, SCRIPT)
    tree.on_exec(ProcExec(50, 1))
    node = tree.get(50)
    assert node is not None and node.runner is not None and node.runner.crate is None
    kernel.records[50] = kernel.latest.pop(50)
    tree.on_exec(ProcExec(50, 2))
    assert (node.role, node.crate) == (Role.BUILD_SCRIPT, None)


def test_a_runner_that_predates_the_daemon_is_mirrored() -> None:
    """Seeded from /proc: the runner by its file's identity, its running script below it."""
    from egress_monitor.provenance import FILE_RUNNER
    tree, _proc = make_tree()
    kernel = FakeKernel()
    tree.kernel = kernel
    kernel.kinds[60], kernel.paths[60] = FILE_RUNNER, RUNNER
    runner = info(RUNNER, CARGO_PKG_NAME="ring", CARGO_PKG_VERSION="0.17.8")
    script = info(SCRIPT, CARGO_PKG_NAME="victim")
    tree.resync([Snapshot(60, 1, runner), Snapshot(61, 60, script)], 1)
    got = tree.get(61)
    assert got is not None and got.build is not None
    assert (got.role, got.crate) == (Role.BUILD_SCRIPT, Crate("ring", "0.17.8"))


def test_a_build_script_gone_before_proc_is_read_has_the_version_of_its_compile() -> None:
    """cargo compiles evil's build script (the compiler's argv and environment name the
    out-dir and the package), then runs it; the script has exec'd on or exited before its
    /proc was read: its version is the compile's. The memory is bounded per build."""
    from egress_monitor.builds import COMPILED_MAX
    from egress_monitor.provenance import K_CARGO, K_CRATE, K_NONE, K_RUSTC, KernelExec
    tree, proc = make_tree()
    kernel = FakeKernel()
    tree.kernel = kernel
    proc.infos[20] = info(CARGO, "cargo", "build")
    kernel.records[20] = KernelExec(K_CARGO, K_NONE, True, CARGO)
    tree.on_exec(ProcExec(20, 1))
    tree.on_fork(ProcFork(20, 21, 2))
    rustc = "/root/.rustup/toolchains/stable/bin/rustc"
    out_dir = BS.rsplit("/", 1)[0]
    proc.infos[21] = info(rustc, "rustc", "--crate-name", "build_script_build", "build.rs",
                          "--out-dir", out_dir, CARGO_PKG_NAME="evil", CARGO_PKG_VERSION="0.3.10")
    kernel.records[21] = KernelExec(K_RUSTC, K_CARGO, False, rustc)
    tree.on_exec(ProcExec(21, 3))
    tree.on_fork(ProcFork(20, 22, 4))
    proc.infos.pop(22, None)  # gone
    kernel.records[22] = KernelExec(K_CRATE, K_CARGO, False, BS)
    tree.on_exec(ProcExec(22, 5))
    script = tree.get(22)
    assert script is not None
    assert (script.role, script.crate) == (Role.BUILD_SCRIPT, Crate("evil", "0.3.10"))
    build = script.build
    assert build is not None
    for i in range(COMPILED_MAX + 5):
        build.compiled(f"/w/target/debug/build/c{i}-0123456789abcdef", Crate(f"c{i}", "1"))
    assert len(build.compiled_scripts) == COMPILED_MAX and out_dir not in build.compiled_scripts
