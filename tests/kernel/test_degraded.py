"""Without identity from the kernel: the start refuses, naming why; --degraded runs and says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.kernel.netlab import REPO, DaemonHandle, TestHost, Workspace, leftover_state, sh


def test_a_host_rule_on_our_mark_bits_stops_the_start(tmp_path: Path) -> None:
    """A policy-routing rule that uses the stamp's bits (as Docker, WireGuard or Tailscale
    might): the daemon must not start over it, and says what to do."""
    sh("ip", "rule", "add", "fwmark", "0x80000000/0x80000000", "table", "4242", "priority",
       "4242")
    try:
        run = subprocess.run(
            [sys.executable, "-m", "egress_monitor.cli", "run", "--events",
             str(tmp_path / "e.jsonl"), "--runtime-dir", str(tmp_path / "run"),
             "--dns-upstream", DaemonHandle.NO_UPSTREAM],
            capture_output=True, text=True, timeout=60, cwd=REPO)
    finally:
        sh("ip", "rule", "del", "priority", "4242", check=False)
    assert run.returncode == 2, run.stderr
    assert "fwmark 0x80000000/0x80000000" in run.stderr, run.stderr
    assert "--degraded" in run.stderr and "--mark-tag" in run.stderr, run.stderr
    assert leftover_state() == []


def test_degraded_attributes_by_names_and_marks_every_event(daemon: DaemonHandle,
                                                            test_host: TestHost,
                                                            workspace: Workspace) -> None:
    daemon.restart("--degraded")
    assert "running degraded" in daemon.log()
    workspace.cargo_build(test_host, "post4")
    event = daemon.wait_event("the build script's connection", lambda e: e["type"] ==
                              "connection" and e["role"] == "build-script")
    assert event["crate"]["name"] == "evil-dep" and event["identity"] == "scan"
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    records = daemon.events()
    assert records and all(r.get("attribution") == "degraded" for r in records
                           if r["type"] in ("connection", "build_start", "build_end", "alert",
                                            "dns")), records
    assert [r["path"] for r in test_host.requests()] == ["/post4"]
