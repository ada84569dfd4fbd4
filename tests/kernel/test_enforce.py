"""Enforcement against the real kernel: per-crate exceptions, kill-build, fail-closed,
hot reload."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.netlab import (
    DaemonHandle,
    TestHost,
    Workspace,
    get_as_build,
    leftover_state,
    pid_alive,
    running,
    wait_until,
)


def attempt_line(out: Path, n: int) -> str:
    """Line ``n`` of the file a test build writes one line per connection attempt to."""
    lines: list[str] = wait_until(f"attempt {n}", lambda: out.exists() and len(
        out.read_text().splitlines()) > n and out.read_text().splitlines())
    return lines[n]


@pytest.fixture
def second_host(tmp_path: Path) -> Iterator[TestHost]:
    """Another test host, never allowed by the policies here."""
    with TestHost(f"{os.getpid() % 10000}-b", 59, tmp_path) as host:
        yield host


def test_per_crate_exception_allows_exactly_that_crate_and_host(
        daemon: DaemonHandle, test_host: TestHost, second_host: TestHost,
        tmp_path: Path) -> None:
    test_host.start_dns()
    daemon.restart("--dns-upstream", test_host.v4, policy="""\
version: 1
mode: enforce
rules:
  - id: evil-dep-to-pkg
    role: build-script
    crate: evil-dep
    to: [{hosts: [pkg.test.example], ports: [8080], protocols: [tcp]}]
    action: allow
""")
    ws = Workspace(tmp_path / "ws", other_crate=True)
    ws.cargo_build(test_host, "resolve4=pkg.test.example,childname=pkg.test.example,postother",
                   resolv_conf=f"nameserver {test_host.v4}\n",
                   env_extra={"EM_OTHER": second_host.v4,
                              "EM_ACTIONS_OTHER_DEP": "resolve4=pkg.test.example,post4"})
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    conns = daemon.events("connection")
    evil = [e for e in conns if (e["crate"] or {}).get("name") == "evil-dep"]
    other = [e for e in conns if (e["crate"] or {}).get("name") == "other-dep"]
    allowed = sorted((e["process"]["exe"].rsplit("/", 1)[-1], e["dst"]["ip"]) for e in evil
                     if e["decision"] == "allow")
    # curl may take the AAAA record: either address of the allowed name is that host.
    assert [exe for exe, _ in allowed] == ["build-script-build", "curl"]
    assert {ip for _, ip in allowed} <= {test_host.v4, test_host.v6}
    assert all(e["rule"] == "evil-dep-to-pkg" for e in evil if e["decision"] == "allow")
    [to_other] = [e for e in evil if e["dst"]["ip"] == second_host.v4]
    assert to_other["decision"] == "deny" and to_other["rule"] == "default:build-script"
    # The other crate: its lookup is refused, and its connection to the same address too.
    assert [(e["decision"], e["dst"]["ip"]) for e in other] == [("deny", test_host.v4)]
    refused = [e for e in daemon.events("dns") if e["crate"]["name"] == "other-dep"]
    assert refused and all(e["decision"] == "deny" and e["rcode"] == "NXDOMAIN"
                           for e in refused)
    assert sorted(r["path"] for r in test_host.requests()) == \
        ["/child", "/resolved/pkg.test.example"]
    assert second_host.requests() == []


def test_kill_build_ends_the_build_and_its_detached_grandchild(
        daemon: DaemonHandle, test_host: TestHost, workspace: Workspace,
        tmp_path: Path) -> None:
    daemon.restart(policy="version: 1\nmode: enforce\n"
                "defaults: {build-script: kill-build}\n")
    result = workspace.cargo_build(test_host, "detach_sleep,post4", check=False)
    assert result.returncode != 0  # cargo was killed with its build
    grandchild = int((workspace.root / "grandchild.pid").read_text())
    event = daemon.wait_event("the killing connection", lambda e: e["type"] == "connection")
    assert event["policy_decision"] == "kill-build" and event["build_killed"] is True
    assert event["decision"] == "deny" and event["role"] == "build-script"
    end = daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    assert end["summary"]["killed_by_rule"] == "default:build-script"
    assert not pid_alive(grandchild)
    assert test_host.requests() == []


ALLOW_OTHER = """\
version: 1
mode: enforce
groups:
  lab: {{cidrs: [{net}]}}
rules:
  - {{id: lab, role: other, to: [lab], action: {action}}}
"""


def test_daemon_killed_fails_closed_and_restart_adopts_the_build(
        daemon: DaemonHandle, test_host: TestHost, tmp_path: Path) -> None:
    daemon.restart(policy=ALLOW_OTHER.format(net=f"{test_host.v4}/32",
                                                     action="allow"))
    go = [tmp_path / f"go{i}" for i in range(3)]
    out = tmp_path / "out"
    script = f"""
import os, socket, time
def attempt(path, timeout):
    t = time.monotonic()
    try:
        s = socket.create_connection(("{test_host.v4}", 8080), timeout=timeout)
        s.sendall(b"GET " + path + b" HTTP/1.0\\r\\n\\r\\n"); s.recv(100); s.close()
        return "connected"
    except OSError as e:
        return f"{{type(e).__name__}} {{time.monotonic() - t:.3f}}"
for i, (path, timeout) in enumerate(((b"/down", 1.5), (b"/failclosed", 10),
                                     (b"/after-restart", 10))):
    while not os.path.exists(f"{tmp_path}/go{{i}}"):
        time.sleep(0.02)
    with open("{out}", "a") as f:
        f.write(attempt(path, timeout) + "\\n")
"""

    def result(n: int) -> str:
        return attempt_line(out, n)

    with running(daemon.exec_argv(sys.executable, "-c", script)) as build:
        start = daemon.wait_event("build_start", lambda e: e["type"] == "build_start")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        # Down: the queue has no reader; the kernel drops the SYN until the client gives up.
        go[0].touch()
        kind, _ = result(0).split()
        assert kind in ("TimeoutError", "timeout")
        # systemd's ExecStopPost would run this: refusals at once while the daemon is down.
        fc = subprocess.run([*daemon.exec_argv()[:3], "failclosed"], capture_output=True,
                            text=True, timeout=60, check=True)
        assert "are refused until the daemon is back" in fc.stdout
        go[1].touch()
        kind, seconds = result(1).split()
        assert kind == "ConnectionRefusedError" and float(seconds) < 1.0
        daemon.start()  # same policy file, found by the restarted daemon
        assert f"adopted build {start['build']['id']}" in daemon.log()
        go[2].touch()
        assert build.wait(timeout=30) == 0
    assert result(2) == "connected"
    after = daemon.wait_event("the connection after restart",
                              lambda e: e["type"] == "connection")
    assert after["build"]["id"] == start["build"]["id"] and after["decision"] == "allow"
    assert [r["path"] for r in test_host.requests()] == ["/after-restart"]


def test_broken_policy_reload_keeps_the_running_policy(
        daemon: DaemonHandle, test_host: TestHost, tmp_path: Path) -> None:
    path = daemon.restart(policy=ALLOW_OTHER.format(net=f"{test_host.v4}/32",
                                                            action="allow"))
    old = daemon.events("daemon")[-1]["policy_digest"]

    def connect(tag: str) -> str:
        return f"{tag}:{get_as_build(daemon, test_host, '/')}"

    path.write_text("version: 1\nmode: enforce\nrules: [ {id: x, action: allow\n")
    wait_until("the rejected reload", lambda: daemon.metric(
        "egress_monitor_policy_reloads_total", result="rejected") == 1)
    rejected = daemon.events("daemon")[-1]
    assert rejected["state"] == "reload_rejected" and rejected["policy_digest"] == old
    assert rejected["errors"][0].startswith(f"{path}:4:1: invalid YAML")
    assert connect("broken") == "broken:ok"  # the old policy still allows it

    time.sleep(0.01)  # a distinct mtime for the next write on coarse-clock filesystems
    path.write_text(ALLOW_OTHER.format(net=f"{test_host.v4}/32", action="deny"))
    os.kill(daemon.proc.pid if daemon.proc else 0, signal.SIGHUP)
    wait_until("the accepted reload", lambda: daemon.metric(
        "egress_monitor_policy_reloads_total", result="ok") >= 1)
    reloaded = [e for e in daemon.events("daemon") if e["state"] == "reload"][-1]
    assert reloaded["policy_digest"] != old
    # The journal says what changed.
    assert (f"policy reloaded from {path}: digest {old[:12]} -> "
            f"{reloaded['policy_digest'][:12]}, 1 rule(s); changed: lab") in daemon.log()
    assert connect("new") == "new:cut-off"  # refused: the sinkhole read it and cut it off


def test_a_stop_keeps_running_builds_refused_until_adopted_and_cleanup_releases_them(
        daemon: DaemonHandle, test_host: TestHost, workspace: Workspace) -> None:
    """SIGTERM (a restart, an upgrade) must not open the gate for builds still running."""
    def step(n: int) -> str:
        (workspace.root / f"go-{n}").touch()
        done = workspace.root / f"done-{n}"
        text: str = wait_until(f"attempt {n}", lambda: done.exists() and done.read_text())
        return text

    with workspace.cargo_build_in_background(test_host, "steps=4") as cargo:
        start = daemon.wait_event("the build script's build", lambda e: e["type"] ==
                                  "build_start")
        assert step(1).startswith("connected HTTP/1.0 200")  # audit: it goes through
        assert daemon.stop() == 0
        left = leftover_state()
        assert any("REJECT" in line and start["cgroup"] in line for line in left), left
        assert not any("NFQUEUE" in line for line in left), left

        # The daemon is gone: the build script's next connection is refused at once.
        outcome, seconds = step(2).rsplit(" ", 1)
        assert outcome == "ConnectionRefused" and float(seconds) < 1.0, (outcome, seconds)

        # A new daemon adopts the build and judges its next connection.
        daemon.start()
        assert f"adopted build {start['build']['id']}" in daemon.log()
        assert step(3).startswith("connected HTTP/1.0 200")

        def judged() -> list[dict[str, Any]]:
            return [e for e in daemon.events("connection") if e["dst"]["ip"] == test_host.v4
                    and e["build"]["id"] == start["build"]["id"]]
        # Step 1 by the first daemon, step 3 by the second (step 2 never left the host).
        _first, second = wait_until("the adopted build's connection", lambda: len(
            judged()) == 2 and judged())
        assert second["role"] == "build-script" and second["crate"]["name"] == "evil-dep"
        assert second["decision"] == "allow" and second["process"] is not None

        # Stopped again with the build still waiting: only cleanup releases it.
        assert daemon.stop() == 0
        assert leftover_state() != []
        cleanup = subprocess.run([*daemon.exec_argv()[:3], "cleanup"], capture_output=True,
                                 text=True, timeout=60, check=False)
        assert cleanup.returncode == 0, cleanup.stderr
        assert leftover_state() == []
        assert step(4).startswith("connected")  # released: unwatched, as cleanup says
        assert cargo.wait(timeout=60) == 0
    assert [r["path"] for r in test_host.requests()] == ["/step-1", "/step-3", "/step-4"]


def test_a_start_that_fails_keeps_leftover_builds_refused(
        daemon: DaemonHandle, test_host: TestHost, tmp_path: Path) -> None:
    """The build holds the sinkhole's port so the next daemon cannot start: its failed start
    must not remove the rules that keep the build refused."""
    out = tmp_path / "out"
    script = f"""
import os, socket, time
def attempt():
    t = time.monotonic()
    try:
        socket.create_connection(("{test_host.v4}", 8080), timeout=5).close()
        return "connected"
    except OSError as e:
        return f"{{type(e).__name__}} {{time.monotonic() - t:.3f}}"
for i in range(2):
    while not os.path.exists(f"{tmp_path}/go{{i}}"):
        time.sleep(0.02)
    with open("{out}", "a") as f:
        f.write(attempt() + "\\n")
"""

    def result(n: int) -> str:
        return attempt_line(out, n)

    with running(daemon.exec_argv(sys.executable, "-c", script)) as build:
        start = daemon.wait_event("build_start", lambda e: e["type"] == "build_start")
        assert daemon.stop() == 0  # the build stays refused
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", 15354))  # the sinkhole's port
        squatter.listen()
        try:
            with pytest.raises(AssertionError, match="cannot listen for refused connections"):
                daemon.start()
            left = leftover_state()
            assert any("REJECT" in line and start["cgroup"] in line for line in left), left
            (tmp_path / "go0").touch()
            kind, seconds = result(0).split()
            assert kind == "ConnectionRefusedError" and float(seconds) < 1.0
        finally:
            squatter.close()
        daemon.start()
        assert f"adopted build {start['build']['id']}" in daemon.log()
        (tmp_path / "go1").touch()
        assert build.wait(timeout=30) == 0
    assert result(1) == "connected"
    judged = daemon.wait_event("the adopted build's connection", lambda e: e["type"] ==
                               "connection" and e["build"]["id"] == start["build"]["id"])
    assert judged["decision"] == "allow"
