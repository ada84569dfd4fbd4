"""Reading /proc, against a fake tree: no secret value is ever kept."""

from __future__ import annotations

import os
from pathlib import Path

from egress_monitor.sources.procfs import ProcFS


def fake_proc(root: Path) -> Path:
    p = root / "4242"
    (p / "fd").mkdir(parents=True)
    (p / "cmdline").write_bytes(b"build-script-build\0--flag\0")
    (p / "environ").write_bytes(
        b"PATH=/usr/bin\0AWS_SECRET_ACCESS_KEY=AKIAFAKESECRET\0CARGO_PKG_NAME=evil\0"
        b"CARGO_PKG_VERSION=0.3.10\0CARGO_MANIFEST_DIR=/w/evil\0CARGO_REGISTRY_TOKEN=tok\0")
    (p / "status").write_text("Name:\tx\n")
    (p / "stat").write_text("4242 (we ird) name)) S 77 4242 4242 0 -1\n")
    (p / "cgroup").write_text("4:memory:/x\n0::/runner.service/egress-build-q1-a-1\n")
    os.symlink("/w/target/debug/build/evil-0123456789abcdef/build-script-build", p / "exe")
    os.symlink("/w/evil", p / "cwd")
    os.symlink("socket:[99]", p / "fd" / "3")
    os.symlink("/dev/null", p / "fd" / "0")
    os.symlink("socket:[100]", p / "fd" / "4")
    (root / "net").mkdir()
    (root / "net" / "icmp").write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"
        "  timeout inode ref pointer drops\n"
        "   1: 0100A8C0:4242 00000000:0000 07 00000000:00000000 00:00000000 00000000     0"
        "        0 555 2 0000000000000000 0\n")
    return root


def test_info_keeps_only_cargo_variables(tmp_path: Path) -> None:
    procfs = ProcFS(str(fake_proc(tmp_path)))
    info = procfs.info(4242)
    assert info.exe == "/w/target/debug/build/evil-0123456789abcdef/build-script-build"
    assert info.argv == ("build-script-build", "--flag") and info.cwd == "/w/evil"
    assert dict(info.cargo_env) == {"CARGO_PKG_NAME": "evil", "CARGO_PKG_VERSION": "0.3.10",
                                    "CARGO_MANIFEST_DIR": "/w/evil"}
    assert "AKIAFAKESECRET" not in repr(info) and "tok" not in repr(info.cargo_env)
    cheap = procfs.info(4242, full=False)
    assert cheap.argv == () and cheap.cargo_env == ()


def test_stat_cgroup_fds_and_net_tables(tmp_path: Path) -> None:
    procfs = ProcFS(str(fake_proc(tmp_path)))
    assert procfs.ppid(4242) == 77  # a comm with spaces and parentheses
    assert procfs.cgroup2(4242) == "/runner.service/egress-build-q1-a-1"
    assert procfs.socket_inodes(4242) == {99, 100}
    assert procfs.net_inodes("icmp", 0x4242) == {555}
    assert procfs.net_inodes("icmp", 1) == set()
    assert list(procfs.pids()) == [4242]


def test_vanished_process_reads_as_unknown(tmp_path: Path) -> None:
    procfs = ProcFS(str(tmp_path))
    info = procfs.info(1)
    assert info.exe is None and info.argv == () and info.cwd is None
    assert procfs.ppid(1) is None and procfs.cgroup2(1) is None
    assert procfs.socket_inodes(1) == set()
