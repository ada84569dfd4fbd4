"""The BPF programs on the real kernel: membership from exec and fork, stamps, the backstop.

Every test loads the real programs at the real cgroup2 root (as the daemon will) and checks
what the kernel did: the mark a socket reads back with ``SO_MARK``, the membership map, what
the test host received. The owner fixture checks that everything is detached and freed after.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egress_monitor.bpf import programs, syscalls
from egress_monitor.bpf.hostmarks import MarkConflict
from egress_monitor.bpf.marks import MarkLayout
from egress_monitor.bpf.owner import CGROUP_PROGRAMS, BpfOwner
from egress_monitor.bpf.programs import (
    FILE_CARGO,
    FILE_RUSTC,
    FILE_TOOL,
    PENDING,
    ROLE_CARGO,
    ROLE_CRATE,
    ROLE_NONE,
    ROLE_RUSTC,
    flow_key,
    member_role,
    member_value,
)
from egress_monitor.enforce.cgroups import Cgroups
from tests.kernel.netlab import TestHost, env_with_cargo, wait_until

CHILD = str(Path(__file__).with_name("bpf_child.py"))
PYTHON = os.path.realpath(sys.executable)
LAYOUT = MarkLayout()
KINDS = ("tcp4", "udp4", "tcp6", "udp6")


def _our_fds() -> list[str]:
    """This process's descriptors that are BPF objects."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "bpf" in target:
            out.append(target)
    return out


@pytest.fixture
def bpf() -> Iterator[BpfOwner]:
    """The real programs at the cgroup2 root; after the test, proof that nothing is left."""
    root = Cgroups.discover().mount
    fds_before = _our_fds()
    owner = BpfOwner.open(LAYOUT, root)
    progs, maps = set(owner.prog_ids.values()), set(owner.map_ids)
    try:
        assert progs <= set(syscalls.ids("prog")) and maps <= set(syscalls.ids("map"))
        assert owner.degraded == {} and "em_sockopt" in owner.prog_ids  # optional, not here
        yield owner
    finally:
        assert owner.close() == []
        cg = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _name, attach in CGROUP_PROGRAMS:
                assert not progs & set(syscalls.prog_query(cg, attach))
        finally:
            os.close(cg)
        assert _our_fds() == fds_before
        # The kernel frees programs and maps after an RCU grace period: await their ids going.
        wait_until("our BPF programs and maps to be freed",
                   lambda: not progs & set(syscalls.ids("prog"))
                   and not maps & set(syscalls.ids("map")), timeout=10)


@pytest.fixture
def cargo_file(tmp_path: Path, bpf: BpfOwner) -> str:
    """A toolchain "cargo" registered by file identity (a copy of the interpreter)."""
    path = tmp_path / "toolchain" / "bin" / "cargo"
    path.parent.mkdir(parents=True)
    shutil.copy2(PYTHON, path)
    bpf.add_cargo_file(str(path))
    return str(path)


def detach_as_root(bpf: BpfOwner, name: str) -> None:
    """What a root process can do: take one of our cgroup programs off the root (bpf(2) by
    id)."""
    attach = dict(CGROUP_PROGRAMS)[name]
    root = os.open(bpf.cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
    prog = syscalls.prog_fd_by_id(bpf.prog_ids[name])
    try:
        syscalls.prog_detach(root, prog, attach)
    finally:
        os.close(prog)
        os.close(root)


def detach_guard(bpf: BpfOwner) -> None:
    """What a root member can do first: take ``em_sockopt`` off the root, so its ``SO_MARK``
    goes through; the backstop must then stand on its own."""
    detach_as_root(bpf, "em_sockopt")


def _start(argv: list[str], env: dict[str, str] | None = None
           ) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise AssertionError(f"{argv} printed nothing (exit {proc.returncode})")
    return proc, json.loads(line)


def _finish(proc: subprocess.Popen[str]) -> None:
    proc.communicate("\n", timeout=10)
    assert proc.returncode == 0


def test_exec_of_cargo_file_makes_a_member_whose_first_sockets_are_stamped(
        bpf: BpfOwner, cargo_file: str) -> None:
    proc, seen = _start([cargo_file, CHILD, "marks"])
    pid = seen["pid"]
    try:
        assert seen["marks"] == {k: LAYOUT.stamp(pid) for k in KINDS}
        assert LAYOUT.creator(seen["marks"]["udp6"]) == pid
        # a new build, not yet named by userspace, whose root is cargo by provenance
        assert bpf.member(pid) == member_value(pid, ROLE_CARGO, pending=True)
    finally:
        _finish(proc)
    assert bpf.member(pid) is None  # the exit program removed it before wait() returned
    assert bpf.stats()["exec_started"] >= 1


def test_a_thread_exit_keeps_membership(bpf: BpfOwner, cargo_file: str) -> None:
    removed = bpf.stats()["exit_removed"]
    proc, seen = _start([cargo_file, CHILD, "thread-marks"])
    try:
        assert seen["marks"] == {k: LAYOUT.stamp(seen["pid"]) for k in KINDS}
        assert bpf.member(seen["pid"]) == member_value(seen["pid"], ROLE_CARGO, pending=True)
        assert bpf.stats()["exit_removed"] == removed
    finally:
        _finish(proc)
    assert bpf.member(seen["pid"]) is None


def test_names_and_copies_are_not_cargo(bpf: BpfOwner, cargo_file: str,
                                        tmp_path: Path) -> None:
    """An unregistered copy at a toolchain-looking path, argv[0] ``cargo``, the real
    interpreter: none is a member, none of their sockets is touched, nor ours."""
    other = tmp_path / "other" / "bin" / "cargo"
    other.parent.mkdir(parents=True)
    shutil.copy2(cargo_file, other)
    for argv, exe in (([str(other), CHILD, "marks"], None), (["cargo", CHILD, "marks"], PYTHON),
                      ([PYTHON, CHILD, "marks"], None)):
        proc = subprocess.Popen(argv, executable=exe, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        seen = json.loads(proc.stdout.readline())
        try:
            assert seen["marks"] == dict.fromkeys(KINDS, 0), argv
            assert bpf.member(seen["pid"]) is None
        finally:
            _finish(proc)
    with socket.socket() as s:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
    assert os.getpid() not in bpf.members()


def test_membership_survives_exec_of_anything_and_double_fork_with_setsid(
        bpf: BpfOwner, cargo_file: str, tmp_path: Path) -> None:
    proc, seen = _start([cargo_file, "-c", HOP, PYTHON, CHILD, "marks"])
    try:
        assert seen["marks"] == {k: LAYOUT.stamp(seen["pid"]) for k in KINDS}
        # the build is kept; cargo exec'ing an unknown file is crate code from then on
        assert bpf.member(seen["pid"]) == member_value(seen["pid"], ROLE_CRATE, pending=True)
    finally:
        _finish(proc)
    out = tmp_path / "detached.json"
    starter = subprocess.run([cargo_file, CHILD, "detach", str(out)], timeout=30, check=True)
    assert starter.returncode == 0
    report = wait_until("the detached grandchild's report",
                        lambda: json.loads(out.read_text()) if out.exists() else None)
    assert report["mark"] == LAYOUT.stamp(report["pid"])
    assert bpf.stats()["fork_followed"] >= 2


HOP = "import os, sys; os.execv(sys.argv[1], sys.argv[1:])"


@pytest.mark.parametrize("chain, role", [
    (["cargo"], ROLE_CARGO),
    (["cargo", "plain"], ROLE_CRATE),          # a build script, a test binary, cargo run
    (["cargo", "tool"], ROLE_CARGO),           # rustup's proxy, git
    (["cargo", "tool", "rustc"], ROLE_RUSTC),  # cargo -> proxy -> rustc
    (["cargo", "plain", "cargo"], ROLE_CRATE),  # crate code running real cargo gains nothing
    (["cargo", "plain", "tool", "cargo"], ROLE_CRATE),
    (["cargo", "rustc", "cargo"], ROLE_RUSTC),  # a proc macro running real cargo
    (["cargo", "rustc", "plain"], ROLE_RUSTC),  # rustc's linker, a proc macro's curl
    (["plain", "tool", "rustc"], None),         # nothing here starts a build
])
def test_roles_follow_file_provenance_and_only_go_down(
        bpf: BpfOwner, tmp_path: Path, chain: list[str], role: int | None) -> None:
    files = {"plain": PYTHON}
    for name, kind in (("cargo", FILE_CARGO), ("rustc", FILE_RUSTC), ("tool", FILE_TOOL)):
        path = tmp_path / name / "bin" / name
        path.parent.mkdir(parents=True)
        shutil.copy2(PYTHON, path)
        bpf.add_toolchain_file(str(path), kind)
        files[name] = str(path)
    argv: list[str] = []
    for name in chain[:-1]:
        argv += [files[name], "-c", HOP]
    proc, seen = _start([*argv, files[chain[-1]], CHILD, "marks"])
    try:
        value = bpf.member(seen["pid"])
        if role is None:
            assert value is None and seen["marks"] == dict.fromkeys(KINDS, 0)
        else:
            assert value is not None and member_role(value) == role
            assert value == member_value(seen["pid"], role, pending=True)
    finally:
        _finish(proc)


def test_an_adopted_launcher_becomes_cargo_only_by_exec_of_cargo(
        bpf: BpfOwner, cargo_file: str) -> None:
    wait_then_exec = "import os, sys; sys.stdin.readline(); os.execv(sys.argv[1], sys.argv[1:])"
    for target, role in ((cargo_file, ROLE_CARGO), (PYTHON, ROLE_NONE)):
        proc = subprocess.Popen([PYTHON, "-c", wait_then_exec, target, CHILD, "marks"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            bpf.set_member(proc.pid, member_value(77))
            proc.stdin.write("\n")
            proc.stdin.flush()
            seen = json.loads(proc.stdout.readline())
            assert bpf.member(seen["pid"]) == member_value(77, role)
        finally:
            _finish(proc)


def test_userspace_adoption_is_followed_by_forks(bpf: BpfOwner) -> None:
    wait_then_run = ("import runpy, sys; sys.stdin.readline(); sys.argv = sys.argv[1:]; "
                     "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.Popen([PYTHON, "-c", wait_then_run, CHILD, "marks"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        bpf.set_member(proc.pid, 42)
        proc.stdin.write("\n")
        proc.stdin.flush()
        seen = json.loads(proc.stdout.readline())
        assert seen["pid"] == proc.pid
        assert seen["marks"] == {k: LAYOUT.stamp(proc.pid) for k in KINDS}
        assert bpf.member(proc.pid) == 42
    finally:
        _finish(proc)


def test_members_read_in_batches_match_a_read_key_by_key(bpf: BpfOwner) -> None:
    """``map_items`` (BPF_MAP_LOOKUP_BATCH, 1,024 a call) gives every entry once, with its
    value, across several batches, as the key-by-key walk does."""
    fake = {4_000_000_000 + i: member_value(7, ROLE_CRATE) + i for i in range(2500)}
    try:
        for tgid, value in fake.items():
            bpf.set_member(tgid, value)
        batched = bpf.members()
        assert {t: v for t, v in batched.items() if t in fake} == fake
        fd = bpf.fds.members if bpf.fds is not None else -1
        by_key = syscalls._items_by_key(fd, 4, 8, programs.MEMBERS_MAX)
        assert sorted(syscalls.map_items(fd, 4, 8, programs.MEMBERS_MAX)) == sorted(by_key)
        assert len(syscalls.map_items(fd, 4, 8, 1500)) == 1500  # the limit holds
    finally:
        for tgid in fake:
            bpf.remove_member(tgid)
    assert not set(bpf.members()) & set(fake)


BUILD_RS = """use std::process::Command;
fn main() {
    let st = Command::new(std::env::var("EM_PYTHON").unwrap())
        .arg(std::env::var("EM_CHILD").unwrap()).arg("detach")
        .arg(std::env::var("EM_REPORT").unwrap()).arg(std::env::var("EM_FIFO").unwrap())
        .status().unwrap();
    assert!(st.success());
}
"""


def test_real_cargo_build_script_children_are_members(bpf: BpfOwner, tmp_path: Path) -> None:
    """Real cargo, found by file identity (``rustup which cargo``), run through rustup's
    proxy: its build script's detached grandchild is still a member of cargo's build, with
    role crate, and its socket carries its own tgid."""
    env = env_with_cargo()
    for tool, kind in (("cargo", FILE_CARGO), ("rustc", FILE_RUSTC)):
        bpf.add_toolchain_file(subprocess.run(["rustup", "which", tool], env=env,
                                              capture_output=True, text=True,
                                              check=True).stdout.strip(), kind)
    proxy = shutil.which("cargo", path=env["PATH"])
    assert proxy is not None
    bpf.add_toolchain_file(proxy, FILE_TOOL)  # resolves to rustup
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / "Cargo.toml").write_text('[package]\nname = "probe"\nversion = "0.1.0"\n'
                                   'edition = "2021"\nbuild = "build.rs"\n')
    (ws / "src" / "lib.rs").write_text("")
    (ws / "build.rs").write_text(BUILD_RS)
    report, fifo = tmp_path / "report.json", tmp_path / "release"
    os.mkfifo(fifo)
    env.update(EM_PYTHON=PYTHON, EM_CHILD=CHILD, EM_REPORT=str(report), EM_FIFO=str(fifo),
               CARGO_TARGET_DIR=str(ws / "target"))
    before = bpf.stats()["exec_started"]
    try:
        subprocess.run([proxy, "build", "--offline", "-q"], cwd=ws, env=env, check=True,
                       timeout=300)
        seen = wait_until("the build script's grandchild report",
                          lambda: json.loads(report.read_text()) if report.exists() else None)
        assert seen["mark"] == LAYOUT.stamp(seen["pid"])
        value = bpf.member(seen["pid"])
        assert value is not None and member_role(value) == ROLE_CRATE
        assert value & PENDING and value & 0xFFFFFFFF != seen["pid"]  # cargo's build
        assert bpf.stats()["exec_started"] > before
    finally:
        with open(fifo, "w"):  # release the grandchild (it waits for a writer)
            pass


def _addr(family: str, text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET if family == "4" else socket.AF_INET6, text)


@pytest.mark.parametrize("proto, family, clear_mark", [
    ("udp", "4", False), ("tcp", "4", False), ("udp", "6", False), ("tcp", "6", False),
    ("udp", "4", True), ("tcp", "6", True)])
def test_backstop_drops_unjudged_member_packets_and_passes_judged_flows(
        bpf: BpfOwner, cargo_file: str, test_host: TestHost, family: str, proto: str,
        clear_mark: bool) -> None:
    """No iptables rules at all (as if flushed): a member's packet reaches the host only
    after its flow has a verdict in the map, even if the member (root, having taken the
    ``SO_MARK`` guard off) cleared its mark; a non-member's passes untouched, even carrying
    our stamp."""
    if clear_mark:
        detach_guard(bpf)
    src, dst = ((test_host.local_v4, test_host.v4) if family == "4"
                else (test_host.local_v6, test_host.v6))
    port = 5353 if proto == "udp" else 8080
    env = dict(os.environ, EM_CLEAR_MARK="1" if clear_mark else "0")
    proc, seen = _start([cargo_file, CHILD, proto, family, src, dst, str(port)], env)
    assert proc.stdin is not None and proc.stdout is not None
    assert LAYOUT.creator(seen["mark"]) == proc.pid
    assert seen["now"] == (0 if clear_mark else seen["mark"])
    try:
        dropped = bpf.stats()["backstop_dropped"]
        proc.stdin.write("unjudged\n")
        proc.stdin.flush()
        assert "error" in json.loads(proc.stdout.readline())  # the kernel refused the send
        assert bpf.stats()["backstop_dropped"] > dropped
        bpf.allow_flow(flow_key(int(family), 17 if proto == "udp" else 6, _addr(family, src),
                                _addr(family, dst), seen["port"], port))
        proc.stdin.write("judged\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"sent": "judged"}
        key = "body" if proto == "udp" else "path"
        wait_until("the judged packet at the host",
                   lambda: any(r.get(key, "").endswith("judged") for r in test_host.requests()))
    finally:
        _finish(proc)
    # A non-member's datagram on the same path is untouched, even with a stamp-like mark.
    with socket.socket(socket.AF_INET if family == "4" else socket.AF_INET6,
                       socket.SOCK_DGRAM) as s:
        if clear_mark:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK,
                         struct.pack("=I", LAYOUT.stamp(os.getpid())))
            assert LAYOUT.creator(s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
                                  & 0xFFFFFFFF) == os.getpid()
        s.sendto(b"outsider", (dst, 5353))
    wait_until("the outsider's datagram",
               lambda: any(r.get("body") == "outsider" for r in test_host.requests()))
    assert not any("unjudged" in (r.get("body", "") + r.get("path", ""))
                   for r in test_host.requests())


def test_flow_key_matches_the_kernel_layout() -> None:
    key = flow_key(4, 17, bytes([198, 51, 100, 1]), bytes([198, 51, 100, 2]), 40000, 5353)
    assert len(key) == 40
    assert key[:8] == struct.pack("!BBxxHH", 4, 17, 40000, 5353)
    assert key[8:12] == bytes([198, 51, 100, 1]) and key[24:28] == bytes([198, 51, 100, 2])


def test_start_refuses_when_a_host_rule_uses_the_reserved_bits() -> None:
    rule = ["rule", "add", "fwmark", "0x80000000/0x80000000", "lookup", "main", "priority",
            "31999"]
    before = set(syscalls.ids("prog"))
    subprocess.run(["ip", *rule], check=True)
    try:
        with pytest.raises(MarkConflict, match=r"fwmark 0x80000000/0x80000000.*reserved"):
            BpfOwner.open(LAYOUT, Cgroups.discover().mount)
        assert set(syscalls.ids("prog")) <= before  # nothing was loaded
    finally:
        subprocess.run(["ip", *rule[:1], "del", *rule[2:]], check=True)


def test_a_root_process_detaching_our_programs_is_reported(bpf: BpfOwner) -> None:
    assert bpf.intact() == []
    detach_as_root(bpf, "em_backstop")
    assert bpf.intact() == [f"em_backstop was detached from {bpf.cgroup_root}"]


def test_bpf_check_command_loads_reports_and_removes_everything() -> None:
    from egress_monitor.bpf import check

    before = set(syscalls.ids("prog"))
    code, lines = check.run()
    assert code == 0, lines
    assert any("toolchain cargo file" in line and "/bin/cargo" in line for line in lines)
    wait_until("bpf-check's programs to be freed",
               lambda: set(syscalls.ids("prog")) <= before, timeout=10)


JOIN = r"""
import json, os, socket, sys
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print(json.dumps({"pid": os.getpid(), "mark": s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
                  & 0xFFFFFFFF}), flush=True)
sys.stdin.readline()
"""


def test_a_process_in_a_tied_cgroup_is_a_member_from_its_first_socket(bpf: BpfOwner) -> None:
    """A container cgroup tied to a build (``join_cgroup``): a process that was no member
    moves itself in and makes a socket at once; the socket is stamped and the process is a
    member with the build's value (its forks follow), before userspace has looked."""
    root = Cgroups.discover().mount
    cg = Path(root) / f"emt-join-{os.getpid()}"
    cg.mkdir()
    try:
        value = member_value(77, ROLE_CRATE)
        bpf.join_cgroup(cg.stat().st_ino, value)
        joined = bpf.stats()["cgroup_joined"]
        proc, seen = _start([PYTHON, "-c", JOIN, str(cg)])
        try:
            assert seen["mark"] == LAYOUT.stamp(seen["pid"])
            assert bpf.member(seen["pid"]) == value
            assert bpf.stats()["cgroup_joined"] == joined + 1
        finally:
            _finish(proc)
        assert bpf.leave_cgroup(cg.stat().st_ino)
        proc, seen = _start([PYTHON, "-c", JOIN, str(cg)])  # no longer tied: untouched
        try:
            assert seen["mark"] == 0 and bpf.member(seen["pid"]) is None
        finally:
            _finish(proc)
    finally:
        cg.rmdir()
