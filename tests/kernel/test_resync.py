"""Lost proc events: the kernel drops them, the daemon counts it and resyncs from /proc."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.kernel.netlab import DaemonHandle, wait_until


@pytest.fixture
def fake_cargo(tmp_path: Path) -> Path:
    """A toolchain cargo for the daemon (registered by identity with --cargo)."""
    path = tmp_path / "bin" / "cargo"
    path.parent.mkdir()
    shutil.copy("/bin/sleep", path)
    return path


@pytest.fixture
def small_buffer_daemon(fake_cargo: Path, daemon: DaemonHandle) -> DaemonHandle:
    """The daemon fixture restarted with a proc-connector buffer that overflows at once."""
    daemon.restart("--proc-rcvbuf", "4096", "--cargo", str(fake_cargo))
    return daemon


def test_build_started_while_events_were_lost_is_found(small_buffer_daemon: DaemonHandle,
                                                       fake_cargo: Path) -> None:
    daemon = small_buffer_daemon
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        # Far more events than 4 KiB holds, then the "cargo" whose exec event is lost too.
        subprocess.run(["sh", "-c", "i=0; while [ $i -lt 400 ]; do /bin/true; i=$((i+1)); "
                        "done"], check=True)
        cargo = subprocess.Popen([str(fake_cargo), "60"])
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    try:
        wait_until("a lost-events report", lambda: daemon.metric(
            "egress_monitor_proc_events_lost_total") >= 1)
        start = daemon.wait_event("the resynced build", lambda e: e["type"] == "build_start")
        assert start["build"]["root_pid"] == cargo.pid
        assert start["build"]["root_exe"] == str(fake_cargo)
        with open(f"/proc/{cargo.pid}/cgroup") as f:
            assert start["cgroup"] in f.read()
    finally:
        cargo.terminate()
        cargo.wait()
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
