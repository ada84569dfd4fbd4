"""Exec records on the real kernel: what ``em_exec`` decided, readable after the process left.

Each test runs real execs (copies of the interpreter registered by file identity, real cargo
through rustup's proxy) under the real programs and reads ``execs`` back; the ``bpf`` fixture
(test_bpf.py) proves everything is detached and freed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from egress_monitor.bpf.execs import ExecRecord
from egress_monitor.bpf.owner import BpfOwner
from egress_monitor.bpf.programs import (
    FILE_CARGO,
    FILE_RUSTC,
    FILE_TOOL,
    ROLE_CARGO,
    ROLE_CRATE,
    ROLE_NONE,
    ROLE_RUSTC,
    kernel_dev,
    member_value,
)
from egress_monitor.bpf.toolchains import register
from tests.kernel import test_bpf
from tests.kernel.netlab import env_with_cargo, wait_until
from tests.kernel.test_bpf import CHILD, PYTHON, _finish, _start

bpf, cargo_file = test_bpf.bpf, test_bpf.cargo_file  # the fixtures, with their teardown checks


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return kernel_dev(st.st_dev), st.st_ino


def _record(bpf: BpfOwner, tgid: int) -> ExecRecord:
    rec = bpf.exec_record(tgid)
    assert rec is not None, f"no exec record for {tgid}"
    return rec


def _files(tmp_path: Path, bpf: BpfOwner) -> dict[str, str]:
    """A registered copy of the interpreter per kind, and the plain interpreter."""
    files = {"plain": PYTHON}
    for name, kind in (("cargo", FILE_CARGO), ("rustc", FILE_RUSTC), ("tool", FILE_TOOL)):
        path = tmp_path / name / "bin" / name
        path.parent.mkdir(parents=True)
        shutil.copy2(PYTHON, path)
        bpf.add_toolchain_file(str(path), kind)
        files[name] = str(path)
    return files


def test_a_cargo_start_is_recorded_with_the_path_execd(bpf: BpfOwner,
                                                       cargo_file: str) -> None:
    before = time.monotonic_ns()
    proc, seen = _start([cargo_file, CHILD, "marks"])
    pid = seen["pid"]
    try:
        rec = _record(bpf, pid)
        assert rec == ExecRecord(
            tgid=pid, ktime_ns=rec.ktime_ns, value=member_value(pid, ROLE_CARGO, pending=True),
            role_before=ROLE_NONE, role_after=ROLE_CARGO, started=True, pending=True, build=pid,
            dev=_identity(cargo_file)[0], inode=_identity(cargo_file)[1], filename=cargo_file)
        # the proc connector's clock: userspace can order a record against an event
        assert before < rec.ktime_ns < time.monotonic_ns()
    finally:
        _finish(proc)
    assert bpf.member(pid) is None and _record(bpf, pid).started  # outlives the process
    assert bpf.forget_exec(pid) and bpf.exec_record(pid) is None and not bpf.forget_exec(pid)


@pytest.mark.parametrize("chain, roles", [
    # cargo -> build script -> its child
    (["cargo", "plain", "plain"], [(ROLE_NONE, ROLE_CARGO), (ROLE_CARGO, ROLE_CRATE),
                                   (ROLE_CRATE, ROLE_CRATE)]),
    # cargo -> rustc -> the linker (or a proc macro's child)
    (["cargo", "rustc", "plain"], [(ROLE_NONE, ROLE_CARGO), (ROLE_CARGO, ROLE_RUSTC),
                                   (ROLE_RUSTC, ROLE_RUSTC)]),
    # cargo -> rustup's proxy -> crate code running real cargo: roles only go down
    (["cargo", "tool", "plain", "cargo"], [(ROLE_NONE, ROLE_CARGO), (ROLE_CARGO, ROLE_CARGO),
                                           (ROLE_CARGO, ROLE_CRATE), (ROLE_CRATE, ROLE_CRATE)]),
])
def test_each_exec_in_a_build_tree_records_role_before_and_after(
        bpf: BpfOwner, tmp_path: Path, chain: list[str],
        roles: list[tuple[int, int]]) -> None:
    files = _files(tmp_path, bpf)
    argv: list[str] = []
    for name in chain[:-1]:
        argv += [files[name], CHILD, "spawn"]
    proc = subprocess.Popen([*argv, files[chain[-1]], CHILD, "marks"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    children: dict[int, int] = {}
    try:
        while True:  # every level says its child; the leaf its marks (then it waits)
            line: dict[str, Any] = json.loads(proc.stdout.readline())
            if "marks" in line:
                break
            children[line["pid"]] = line["child"]
        tree = [proc.pid]
        while tree[-1] in children:
            tree.append(children[tree[-1]])
        assert len(tree) == len(chain) and tree[-1] == line["pid"]
        records = [_record(bpf, pid) for pid in tree]
        assert [(r.role_before, r.role_after) for r in records] == roles
        assert [r.started for r in records] == [True] + [False] * (len(chain) - 1)
        assert all(r.pending and r.build == proc.pid for r in records)  # cargo's build
        assert [r.filename for r in records] == [files[n] for n in chain]
        assert [(r.dev, r.inode) for r in records] == [_identity(files[n]) for n in chain]
        assert [r.ktime_ns for r in records] == sorted(r.ktime_ns for r in records)
        assert records[-1].value == bpf.member(tree[-1])
    finally:
        _finish(proc)


def test_a_member_that_execs_and_exits_at_once_leaves_its_record(
        bpf: BpfOwner, cargo_file: str) -> None:
    """The case the record exists for: by the time userspace looks, /proc/PID and the members
    entry are gone; the record still says what the kernel decided."""
    proc, seen = _start([cargo_file, CHILD, "spawn", PYTHON, "-S", "-c", "pass"])
    assert proc.stdout is not None
    try:
        child = seen["child"]
        assert json.loads(proc.stdout.readline()) == {"exited": child}  # and reaped
        assert not os.path.exists(f"/proc/{child}") and bpf.member(child) is None
        rec = _record(bpf, child)
        assert (rec.role_before, rec.role_after, rec.started, rec.build) == (
            ROLE_CARGO, ROLE_CRATE, False, proc.pid)
        assert rec.filename == PYTHON and (rec.dev, rec.inode) == _identity(PYTHON)
    finally:
        _finish(proc)


WAIT_THEN_EXEC = ("import os, sys; print(os.getpid(), flush=True); sys.stdin.readline(); "
                  "os.execv(sys.argv[1], sys.argv[1:])")


def test_a_second_exec_overwrites_the_record(bpf: BpfOwner,
                                             cargo_file: str) -> None:
    proc = subprocess.Popen([cargo_file, "-c", WAIT_THEN_EXEC, PYTHON, CHILD, "marks"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert int(proc.stdout.readline()) == proc.pid
        first = _record(bpf, proc.pid)
        assert first.started and first.filename == cargo_file
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["pid"] == proc.pid
        second = _record(bpf, proc.pid)
        assert second.ktime_ns > first.ktime_ns
        assert (second.role_before, second.role_after, second.started) == (
            ROLE_CARGO, ROLE_CRATE, False)
        assert second.build == first.build == proc.pid and second.filename == PYTHON
    finally:
        _finish(proc)


def test_a_non_members_execs_leave_no_record(bpf: BpfOwner, tmp_path: Path) -> None:
    files = _files(tmp_path, bpf)
    recorded = bpf.stats()["exec_recorded"]
    for name in ("plain", "tool", "rustc"):
        proc, seen = _start([files[name], CHILD, "marks"])
        try:
            assert bpf.member(seen["pid"]) is None and bpf.exec_record(seen["pid"]) is None
        finally:
            _finish(proc)
    assert bpf.stats()["exec_recorded"] == recorded
    assert bpf.stats()["exec_unrecorded"] == 0


BUILD_RS = """fn main() {
    std::fs::write(std::env::var("EM_REPORT").unwrap(), std::process::id().to_string())
        .unwrap();
}
"""


def test_real_cargo_through_rustups_proxy_with_everything_registered(
        bpf: BpfOwner, tmp_path: Path) -> None:
    """``toolchains.register`` finds rustup, git, the toolchains' cargo and rustc files; the
    proxy exec is a tool (nothing for a non-member), the toolchain cargo it execs starts the
    build, and the build script, long gone when the build ends, left its record."""
    env = env_with_cargo()
    done = register(bpf, env)
    which = {tool: subprocess.run(["rustup", "which", tool], env=env, capture_output=True,
                                  text=True, check=True).stdout.strip()
             for tool in ("cargo", "rustc")}
    proxy = shutil.which("cargo", path=env["PATH"])
    assert proxy is not None
    assert (which["cargo"], FILE_CARGO) in done and (which["rustc"], FILE_RUSTC) in done
    assert (os.path.realpath(proxy), FILE_TOOL) in done
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / "Cargo.toml").write_text('[package]\nname = "probe"\nversion = "0.1.0"\n'
                                   'edition = "2021"\nbuild = "build.rs"\n')
    (ws / "src" / "lib.rs").write_text("")
    (ws / "build.rs").write_text(BUILD_RS)
    report = tmp_path / "build-script.pid"
    env.update(EM_REPORT=str(report), CARGO_TARGET_DIR=str(ws / "target"))
    proc = subprocess.Popen([proxy, "build", "--offline", "-q"], cwd=ws, env=env)
    assert proc.wait(timeout=300) == 0
    root = _record(bpf, proc.pid)  # rustup exec'd the toolchain's cargo in the same process
    assert root.started and (root.dev, root.inode) == _identity(which["cargo"])
    assert os.path.samefile(root.filename, which["cargo"])
    script = int(report.read_text())
    assert bpf.member(script) is None
    rec = _record(bpf, script)
    assert (rec.role_before, rec.role_after, rec.build) == (ROLE_CARGO, ROLE_CRATE, proc.pid)
    assert rec.filename.endswith("/build-script-build")
    assert (rec.dev, rec.inode) == _identity(rec.filename)
    wait_until("no exec left unrecorded", lambda: bpf.stats()["exec_unrecorded"] == 0)


def test_an_adopted_member_exec_of_cargo_is_recorded_as_no_start(
        bpf: BpfOwner, cargo_file: str) -> None:
    """Userspace adopted the launcher (build 77, role none): its exec of cargo raises it to
    cargo without starting a new build, and the record says so."""
    proc = subprocess.Popen([PYTHON, "-c", WAIT_THEN_EXEC, cargo_file, CHILD, "marks"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert int(proc.stdout.readline()) == proc.pid
        assert bpf.exec_record(proc.pid) is None  # not a member when it exec'd the interpreter
        bpf.set_member(proc.pid, member_value(77))
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["pid"] == proc.pid
        rec = _record(bpf, proc.pid)
        assert (rec.role_before, rec.role_after, rec.started, rec.pending, rec.build) == (
            ROLE_NONE, ROLE_CARGO, False, False, 77)
        assert rec.filename == cargo_file
    finally:
        _finish(proc)
