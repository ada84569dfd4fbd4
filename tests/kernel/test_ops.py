"""Runner operations with root and real programs: systemd-analyze, install, status,
known-bad crates."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.kernel.netlab import DaemonHandle, TestHost, Workspace

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "egress-monitor.service"


def test_unit_verifies_clean_and_scores_4_or_lower(tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing (make test installs it)"
    # The unit names the installed binary; point it at this checkout's so verify can see an
    # executable there. Nothing else in the unit changes.
    binary = shutil.which("egress-monitor", path=os.path.dirname(sys.executable))
    assert binary is not None
    unit = tmp_path / "egress-monitor.service"
    unit.write_text(UNIT.read_text().replace("/opt/egress-monitor/venv/bin/egress-monitor",
                                             binary))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert verify.returncode == 0 and verify.stdout == "" and verify.stderr == "", \
        verify.stdout + verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                              capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for egress-monitor\.service: (\d+\.\d)",
                  security.stdout)
    assert m, security.stdout + security.stderr
    assert float(m.group(1)) <= 4.0, security.stdout


EXPECTED = {
    "etc/systemd/system/egress-monitor.service",
    "etc/egress-monitor/config.yaml",
    "etc/egress-monitor/policy.yaml",
    "etc/egress-monitor/iocs.yaml",
    "etc/logrotate.d/egress-monitor",
    "usr/local/bin/egress-monitor",
    *(f"opt/egress-monitor/docs/{p.name}" for p in (REPO / "docs").glob("*.md")),
}
STUB_SYSTEMCTL = """#!/bin/sh
# A stand-in for systemctl: records each call; is-active answers from the state file.
echo "$*" >> "$STUB_DIR/calls"
case "$1" in
  is-active) [ "$(cat "$STUB_DIR/state" 2>/dev/null)" = active ] ;;
  start|restart) echo active > "$STUB_DIR/state" ;;
esac
"""


def install(root: Path, stub: Path, source: Path = REPO, **env: str) -> tuple[str, list[str]]:
    """Run the install script with a stub systemctl on PATH; its output and the stub's calls
    made by this run."""
    calls = stub / "calls"
    calls.unlink(missing_ok=True)
    run_env = dict(os.environ, DESTDIR=str(root), PYTHON=sys.executable, SYSTEMD="yes",
                   STUB_DIR=str(stub), PATH=f"{stub}:{os.environ['PATH']}", **env)
    out = subprocess.run(["bash", str(source / "scripts" / "install.sh"), "install"],
                         env=run_env, check=True, timeout=600, capture_output=True,
                         text=True).stdout
    return out, calls.read_text().splitlines() if calls.exists() else []


def stub_systemctl(tmp_path: Path) -> Path:
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "systemctl").write_text(STUB_SYSTEMCTL)
    (stub / "systemctl").chmod(0o755)
    return stub


def test_install_upgrade_and_uninstall_into_a_destdir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stub = stub_systemctl(tmp_path)
    out, calls = install(root, stub)
    assert calls == ["daemon-reload", "enable --quiet egress-monitor.service",
                     "is-active --quiet egress-monitor.service",
                     "start egress-monitor.service"], calls
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    venv = {f for f in files if f.startswith("opt/egress-monitor/venv/")}
    assert files - venv == EXPECTED
    # Runtime files only: no test or lint tool in the runner's virtualenv.
    assert not {f for f in venv if re.search(r"site-packages/(pytest|_pytest|ruff|mypy)", f)}
    assert os.readlink(root / "usr/local/bin/egress-monitor") == \
        "/opt/egress-monitor/venv/bin/egress-monitor"
    assert (root / "etc/egress-monitor/policy.d").is_dir()
    installed = root / "opt/egress-monitor/venv/bin/egress-monitor"
    out = subprocess.run([str(installed), "policy", "check",
                          str(root / "etc/egress-monitor/policy.yaml")], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert "ok, mode audit" in out
    assert (root / "etc/egress-monitor/policy.yaml").read_text() == \
        (REPO / "policies/default.yaml").read_text()

    # An upgrade over the running unit: the installed code differs from this release's
    # (an older install), so the unit is restarted; the operator's edits are kept.
    (root / "etc/egress-monitor/config.yaml").write_text("version: 1\nrunner_name: edited\n")
    old = next(root.glob("opt/egress-monitor/venv/lib/python*/site-packages/"
                         "egress_monitor/daemon.py"))
    old.write_text(old.read_text() + "\n# the previous release\n")
    out, calls = install(root, stub)
    assert "restart egress-monitor.service" in calls, calls
    assert "upgraded: its files changed, restarted the running egress-monitor.service" in out
    assert "previous release" not in old.read_text()
    assert "edited" in (root / "etc/egress-monitor/config.yaml").read_text()
    # The same release again: nothing to restart.
    out, calls = install(root, stub)
    assert not any(c.startswith(("restart", "start")) for c in calls), calls
    assert "nothing changed" in out

    subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "uninstall"],
                   env=dict(os.environ, DESTDIR=str(root), SYSTEMD="no"), check=True,
                   timeout=120, capture_output=True)
    assert [p for p in root.rglob("*") if not p.is_dir()] == []


def test_dist_installs_with_no_package_index(tmp_path: Path) -> None:
    dist = tmp_path / "dist" / "egress-monitor-x"
    subprocess.run(["make", "-s", "dist", f"DIST={dist}"], cwd=REPO, check=True, timeout=600,
                   capture_output=True)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-C", str(unpacked), "-xzf", f"{dist}.tar.gz"], check=True)
    source = unpacked / "egress-monitor-x"
    assert not (source / "egress_monitor").exists()  # only wheels: nothing built on the runner
    root = tmp_path / "root"
    # No pip configuration (this machine's has local indexes) and no index at all.
    install(root, stub_systemctl(tmp_path), source=source, PIP_CONFIG_FILE=os.devnull,
            PIP_NO_INDEX="1")
    version = subprocess.run([str(root / "opt/egress-monitor/venv/bin/egress-monitor"),
                              "--version"], capture_output=True, text=True, check=True,
                             timeout=60).stdout
    from egress_monitor import __version__
    assert version == f"egress-monitor {__version__}\n"


def test_status_shows_a_build_in_progress(daemon: DaemonHandle, tmp_path: Path) -> None:
    go = tmp_path / "go"
    build = subprocess.Popen(daemon.exec_argv(
        "sh", "-c", f"while [ ! -e {go} ]; do sleep 0.02; done"), cwd=tmp_path)
    try:
        start = daemon.wait_event("build_start", lambda e: e["type"] == "build_start")
        status = subprocess.run([*daemon.exec_argv()[:3], "status", "--runtime-dir",
                                 str(daemon.runtime_dir)], capture_output=True, text=True,
                                check=True, timeout=30).stdout
        assert daemon.proc is not None
        assert f"egress-monitor: running (pid {daemon.proc.pid}" in status
        assert "builds active: 1" in status
        line = next(ln for ln in status.splitlines() if start["build"]["id"] in ln)
        assert "dash" in line and str(tmp_path) in line and "0 allowed, 0 denied" in line
    finally:
        go.touch()
        build.wait(timeout=30)


def test_known_bad_crate_alerts_and_policy_can_kill_the_build(
        daemon: DaemonHandle, test_host: TestHost, tmp_path: Path) -> None:
    iocs = tmp_path / "iocs.yaml"
    iocs.write_text("version: 1\ncrates:\n  - {name: evil-dep, versions: '=0.3.10', "
                    "why: test indicator}\n")
    daemon.restart("--iocs", str(iocs), policy="version: 1\nmode: audit\n")
    # The build script lives a moment, as one that does anything does: a process that exits
    # before the daemon reads /proc cannot be named at its exec (docs/architecture.md).
    Workspace(tmp_path / "ws1").cargo_build(test_host, "sleep=300")  # audit: alert only
    alert = daemon.wait_event("the alert", lambda e: e["type"] == "alert"
                              and e["role"] == "build-script")
    assert alert["kind"] == "known_bad_crate" and alert["severity"] == "critical"
    assert alert["evidence"]["crate"] == "evil-dep" and alert["evidence"]["version"] == "0.3.10"
    assert alert["evidence"]["build_killed"] is False and alert["evidence"]["stage"] == \
        "build-script"
    # rustc compiling it came first: one alert per stage
    assert [(e["role"], e["evidence"]["stage"]) for e in daemon.events("alert")] == [
        ("rustc", "compile"), ("build-script", "build-script")]

    daemon.restart("--iocs", str(iocs),
                   policy="version: 1\nmode: enforce\nknown_bad_crates: kill-build\n")
    ws = Workspace(tmp_path / "ws2")
    result = ws.cargo_build(test_host, "sleep=300,detach_sleep", check=False)
    assert result.returncode != 0
    killed = daemon.wait_event("the kill", lambda e: e["type"] == "alert"
                               and e["evidence"]["build_killed"])
    end = daemon.wait_event("build_end", lambda e: e["type"] == "build_end"
                            and e["build"]["id"] == killed["build"]["id"])
    assert end["summary"]["killed_by_rule"] == "known_bad_crates"
    assert daemon.metric("egress_monitor_known_bad_crates_total") == 1
