"""The connection gate against the real kernel and real cargo builds (audit mode)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from egress_monitor.enforce.cgroups import Cgroups
from egress_monitor.enforce.rules import jump_spec
from tests.kernel.netlab import (
    DaemonHandle,
    TestHost,
    Workspace,
    leftover_state,
    pid_alive,
    running,
)


def _from_build_script(event: dict[str, Any]) -> bool:
    return bool(event["type"] == "connection" and event["role"] == "build-script")


def _exes(event: dict[str, Any]) -> list[str]:
    return [os.path.basename(step["exe"] or "?") for step in event["lineage"]]


def test_build_script_post_is_attributed_to_its_crate(daemon: DaemonHandle, test_host: TestHost,
                                                      workspace: Workspace) -> None:
    workspace.cargo_build(test_host, "post4")

    event = daemon.wait_event("the build script's connection", _from_build_script)
    assert event["crate"] == {"name": "evil-dep", "version": "0.3.10"}
    assert event["protocol"] == "tcp" and event["family"] == "ipv4"
    assert event["dst"] == {"ip": test_host.v4, "port": 8080, "names": []}
    assert event["decision"] == "allow" and event["mode"] == "audit"
    assert event["attribution"] == "process"
    assert os.path.basename(event["process"]["exe"]) == "build-script-build"
    assert event["process"]["uid"] == 0
    lineage = _exes(event)
    assert lineage[0] == "cargo" and lineage[-1] == "build-script-build", lineage
    assert event["lineage"][-1]["pid"] == event["process"]["pid"]
    assert os.path.basename(event["build"]["root_exe"]) == "cargo"
    assert event["build"]["cwd"] == str(workspace.root)

    # Audit mode let it through: the test host got the POST.
    posts = [r for r in test_host.requests() if r.get("path") == "/post4"]
    assert [p["method"] for p in posts] == ["POST"]

    end = daemon.wait_event("build_end", lambda e: e["type"] == "build_end"
                            and e["build"]["id"] == event["build"]["id"])
    # Only the first packet of the flow reached the daemon: one event for the whole exchange.
    summary = end["summary"]
    assert summary["connections_by_role"] == {"build-script": {"allow": 1}}, summary
    starts = daemon.events("build_start")
    assert [s["build"]["id"] for s in starts] == [event["build"]["id"]]
    assert daemon.metric("egress_monitor_connections_total", role="build-script",
                         decision="allow", protocol="tcp") == 1
    assert daemon.metric("egress_monitor_builds_total") == 1
    assert daemon.metric("egress_monitor_verdict_latency_seconds_count") >= 1


def test_child_of_build_script_keeps_role_and_crate(daemon: DaemonHandle, test_host: TestHost,
                                                    workspace: Workspace) -> None:
    workspace.cargo_build(test_host, "child")

    event = daemon.wait_event("curl's connection", _from_build_script)
    assert event["process"]["exe"] == "/usr/bin/curl"
    assert event["process"]["argv"][0] == "curl"
    assert event["crate"] == {"name": "evil-dep", "version": "0.3.10"}
    lineage = _exes(event)
    assert lineage[0] == "cargo" and lineage[-2:] == ["build-script-build", "curl"], lineage
    assert [r["path"] for r in test_host.requests()] == ["/child"]


def test_double_forked_process_is_attributed_after_cargo_exits(
        daemon: DaemonHandle, test_host: TestHost, workspace: Workspace) -> None:
    workspace.cargo_build(test_host, "detach")
    start = daemon.wait_event("build_start", lambda e: e["type"] == "build_start")
    build_id = start["build"]["id"]
    # cargo has exited; the detached process keeps the build open.
    assert not pid_alive(start["build"]["root_pid"])
    assert not [e for e in daemon.events("build_end") if e["build"]["id"] == build_id]

    (workspace.root / "go").touch()
    event = daemon.wait_event("the detached connection", _from_build_script)
    assert event["build"]["id"] == build_id
    assert event["process"]["exe"] == "/usr/bin/curl"
    assert event["crate"] == {"name": "evil-dep", "version": "0.3.10"}
    lineage = _exes(event)
    assert lineage[0] == "cargo" and "build-script-build" in lineage, lineage
    # The build script and cargo exited before the connection: the lineage came from the
    # fork events seen at the time, not from /proc (where the process now hangs off init).
    script = next(s for s in event["lineage"] if s["exe"].endswith("/build-script-build"))
    assert not pid_alive(script["pid"]) and not pid_alive(event["lineage"][0]["pid"])
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end"
                      and e["build"]["id"] == build_id)


def test_ipv6_udp_and_icmp_flows_are_seen(daemon: DaemonHandle, test_host: TestHost,
                                          workspace: Workspace) -> None:
    workspace.cargo_build(test_host, "post6,udp4,udp6,icmp4")
    end = daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    seen = {(e["protocol"], e["family"], e["dst"]["ip"], e["dst"]["port"]): e
            for e in daemon.events("connection")}
    expected = {
        ("tcp", "ipv6", test_host.v6, 8080),
        ("udp", "ipv4", test_host.v4, 5353),
        ("udp", "ipv6", test_host.v6, 5353),
        ("icmp", "ipv4", test_host.v4, 0),
    }
    assert expected <= set(seen), sorted(seen)
    for key in expected:
        event = seen[key]
        assert event["role"] == "build-script", (key, event)
        assert event["crate"] == {"name": "evil-dep", "version": "0.3.10"}, key
        assert event["build"]["id"] == end["build"]["id"]
    assert seen[("icmp", "ipv4", test_host.v4, 0)]["process"]["exe"].endswith(
        ("python3", "python3.11"))
    got = {(r["proto"], r.get("path") or r.get("body")) for r in test_host.requests()}
    assert {("tcp", "/post6"), ("udp", "udp4"), ("udp", "udp6")} <= got


def test_process_outside_builds_is_never_queued(daemon: DaemonHandle, test_host: TestHost,
                                                tmp_path: Path) -> None:
    go = tmp_path / "go"
    with running(daemon.exec_argv(
            "sh", "-c", f"while [ ! -e {go} ]; do sleep 0.02; done; "
            f"curl -s -o /dev/null http://{test_host.v4}:8080/inside")) as build:
        daemon.wait_event("build_start", lambda e: e["type"] == "build_start")
        # While a build and its queue rule are live, this process connects too.
        with socket.create_connection((test_host.v4, 8080), timeout=5) as conn:
            outside_port = conn.getsockname()[1]
            conn.sendall(b"GET /outside HTTP/1.0\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.0 200")
        go.touch()
        assert build.wait(timeout=30) == 0
    inside = daemon.wait_event("the build's connection", lambda e: e["type"] == "connection")
    assert inside["process"]["exe"] == "/usr/bin/curl"
    assert inside["build"]["root_exe"] == "/usr/bin/dash"
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    connections = daemon.events("connection")
    assert len(connections) == 1, connections
    assert all(e["src"]["port"] != outside_port for e in connections)
    assert daemon.metric("egress_monitor_connections_total", role="other", decision="allow",
                         protocol="tcp") == 1
    assert [r["path"] for r in test_host.requests()] == ["/outside", "/inside"]


def test_exec_passes_exit_status_through_and_is_a_build(daemon: DaemonHandle,
                                                        tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    script = (f"cg=$(sed -n 's/^0:://p' /proc/self/cgroup); echo $cg > {seen}; "
              f"cat {Cgroups.discover().mount}$cg/cgroup.pressure >> {seen}; exit 7")
    result = subprocess.run(daemon.exec_argv("sh", "-c", script), timeout=30, check=False)
    assert result.returncode == 7
    start = daemon.wait_event("build_start", lambda e: e["type"] == "build_start")
    assert start["via"] == "exec"
    assert start["build"]["root_exe"] == "/usr/bin/dash"
    assert start["argv"] == ["sh", "-c", script]
    assert "/egress-build-" in start["cgroup"]
    # The command ran inside the build's cgroup from its first instruction, with the
    # cgroup's own PSI accounting off (see enforce/cgroups.py).
    assert seen.read_text().split() == [start["cgroup"], "0"]
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")


def test_second_instance_refuses_to_start(daemon: DaemonHandle, tmp_path: Path) -> None:
    # Another runtime directory: the lock is host-wide, as the chain and queues are.
    other = tmp_path / "second"
    result = subprocess.run(
        [*daemon.exec_argv()[:3], "run", "--events", str(other / "events.jsonl"),
         "--runtime-dir", str(other / "run")],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "another egress-monitor is already running" in result.stderr
    assert daemon.proc is not None and f"(pid {daemon.proc.pid}," in result.stderr
    # The first one is unharmed: its chain is intact and it still answers.
    assert subprocess.run(["iptables", "-w", "-C", *jump_spec()], check=False).returncode == 0
    assert daemon.metric("egress_monitor_builds_active") == 0


def test_stop_with_no_build_running_leaves_nothing_behind(daemon: DaemonHandle) -> None:
    subprocess.run(daemon.exec_argv("true"), check=True, timeout=60)
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    assert daemon.stop() == 0
    assert leftover_state() == []
    stop = [e for e in daemon.events("daemon") if e["state"] == "stop"]
    assert len(stop) == 1
