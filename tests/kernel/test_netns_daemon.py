"""The real daemon and real cargo builds in another network namespace (issue 11).

The "container" is a namespace whose only link leads to the test host (``netns_lab``); cargo
runs wholly inside it (``ip netns exec``), as a container job's would. The daemon runs in the
host's namespace and must open the namespace's gate itself: what reached the test host and
what the events say are checked.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.netlab import DaemonHandle, TestHost, Workspace, wait_until
from tests.kernel.netns_lab import Lab, lab, open_lab

__all__ = ["lab"]  # the fixture


def _inside(lab: Lab) -> Any:
    return lambda argv: ["ip", "netns", "exec", lab.ns, *argv]


def _net_fds(pid: int) -> set[str]:
    """The network namespaces a process holds descriptors of (``net:[INODE]``)."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("net:["):
                out.add(link)
    return out


def _from_build_script(event: dict[str, Any]) -> bool:
    return bool(event["type"] == "connection" and event["role"] == "build-script")


@pytest.fixture
def resolver_host(tmp_path: Path) -> Iterator[TestHost]:
    """An upstream resolver for the daemon, reached from the host's namespace only."""
    with TestHost(f"{os.getpid() % 10000}-r", 58, tmp_path) as host:
        host.start_dns()
        yield host


@pytest.fixture
def ns_resolv_conf(lab: Lab) -> Iterator[None]:
    """The namespace's /etc/resolv.conf (``ip netns exec`` mounts /etc/netns/NAME/...): a
    test address, never this machine's resolver. Its port 53 is redirected to the daemon."""
    top = Path("/etc/netns")
    made_top = not top.exists()
    folder = top / lab.ns
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "resolv.conf").write_text(f"nameserver {lab.host.v4}\n")
    try:
        yield
    finally:
        (folder / "resolv.conf").unlink(missing_ok=True)
        folder.rmdir()
        if made_top:
            top.rmdir()


def test_audit_records_a_build_run_wholly_in_another_namespace(
        daemon: DaemonHandle, lab: Lab, workspace: Workspace, resolver_host: TestHost,
        ns_resolv_conf: None) -> None:
    daemon.restart("--dns-upstream", resolver_host.v4)
    workspace.cargo_build(lab.host, "post4,udp4,resolve4=pkg.test.example", wrap=_inside(lab))
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    inode = os.stat(lab.path).st_ino
    conns = [e for e in daemon.events("connection") if _from_build_script(e)]
    to_host = {(e["protocol"], e["dst"]["port"]) for e in conns if e["dst"]["ip"] == lab.host.v4}
    assert to_host == {("tcp", 8080), ("udp", 5353)}
    for e in conns:
        assert e["crate"] == {"name": "evil-dep", "version": "0.3.10"}
        assert e["netns"] == inode and e["decision"] == "allow"
    assert {r.get("path") for r in lab.host.requests()} >= {"/post4"}
    # DNS from inside: answered by the daemon (through the gate's listener) and recorded.
    queries = [e for e in daemon.events("dns") if e["query"]["name"] == "pkg.test.example"]
    assert queries and {e["query"]["type"] for e in queries} >= {"A"}
    assert all(e["role"] == "build-script" and e["crate"]["name"] == "evil-dep"
               and e["answers"] for e in queries)
    assert all(e["netns"] == inode and "container" not in e for e in queries), queries
    assert "gated network namespace" in daemon.log()


def test_enforce_refuses_a_post_from_inside_and_nothing_reaches_the_host(
        daemon: DaemonHandle, lab: Lab, workspace: Workspace) -> None:
    daemon.restart(policy="version: 1\nmode: enforce\n")
    workspace.cargo_build(lab.host, "post4", wrap=_inside(lab))
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    event = daemon.wait_event("the refused POST", _from_build_script)
    assert event["decision"] == "deny" and event["crate"]["name"] == "evil-dep"
    assert event["netns"] == os.stat(lab.path).st_ino
    assert lab.host.requests() == []
    # The sinkhole inside the namespace took the refused POST: its record says where too.
    sunk = daemon.wait_event("the sinkhole's record", lambda e: e["type"] == "alert" and
                             e["kind"] == "blocked_attempt" and e["role"] == "build-script")
    assert sunk["netns"] == event["netns"], sunk
    assert lab.leftovers() == []  # the gate closed with the build


ENTER_AND_POST = """
import os
os.execvp("nsenter", ["nsenter", "--net={path}", "curl", "-s", "-m", "20", "-o", "/dev/null",
                      "-X", "POST", "-d", "from=nsenter", "http://{v4}:8080/nsenter"])
"""

SETNS_AND_POST = """
import ctypes, os, socket
fd = os.open("{path}", os.O_RDONLY)
assert ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) == 0  # no exec after this
try:
    s = socket.create_connection(("{v4}", 8080), timeout=20)
    s.sendall(b"POST /setns HTTP/1.0\\r\\nContent-Length: 1\\r\\n\\r\\nx")
    s.recv(100)
except OSError as e:
    print("setns post:", e)
"""


@pytest.mark.parametrize("how", ["nsenter", "setns"])
def test_a_build_script_child_that_moves_into_another_namespace_is_judged_there(
        daemon: DaemonHandle, lab: Lab, workspace: Workspace, how: str) -> None:
    """The build runs in the host's namespace; a child of its build script enters the
    namespace (``nsenter`` execs curl there; or ``setns`` with no exec at all: only the
    kernel's report of the member's socket there tells the daemon) and POSTs. Audit records
    it with the build script's crate and the namespace; enforce refuses it."""
    script = ENTER_AND_POST if how == "nsenter" else SETNS_AND_POST
    (workspace.root / "mover.py").write_text(script.format(path=lab.path, v4=lab.host.v4))
    workspace.cargo_build(lab.host, "py=mover")
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    inode = os.stat(lab.path).st_ino
    [event] = [e for e in daemon.events("connection") if e["dst"]["ip"] == lab.host.v4]
    assert event["crate"] == {"name": "evil-dep", "version": "0.3.10"}
    assert event["role"] == "build-script" and event["netns"] == inode
    assert event["decision"] == "allow"
    assert [r["path"] for r in lab.host.requests()] == [f"/{how}"]

    daemon.restart(policy="version: 1\nmode: enforce\n")
    (workspace.root / "target").rename(workspace.root / "target-audit")  # run it again
    workspace.cargo_build(lab.host, "py=mover", check=False)  # the refused child fails it
    refused = daemon.wait_event("the refused POST", lambda e: e["type"] == "connection"
                                and e["mode"] == "enforce" and e["dst"]["ip"] == lab.host.v4)
    assert refused["decision"] == "deny" and refused["netns"] == inode
    assert [r["path"] for r in lab.host.requests()] == [f"/{how}"]  # nothing more arrived
    wait_until("the second build's end", lambda: len(daemon.events("build_end")) == 2)
    assert lab.leftovers() == []


def test_a_daemon_stopped_while_a_gated_build_runs_leaves_it_refused_there(
        daemon: DaemonHandle, lab: Lab, workspace: Workspace) -> None:
    """The host's rules stay refusing a running build when the daemon stops; so must the
    namespace's gate (with the daemon gone there is no backstop either)."""
    root = workspace.root
    done: list[Any] = []
    build = threading.Thread(target=lambda: done.append(workspace.cargo_build(
        lab.host, "steps=2", wrap=_inside(lab), check=False)))
    build.start()
    try:
        (root / "go-1").touch()
        first = wait_until("step 1", lambda: (root / "done-1").exists()
                           and (root / "done-1").read_text(), timeout=120)
        assert first.startswith("connected HTTP/1.0 200")
        assert daemon.stop() == 0
        rules = lab.ns_sh("iptables-save")
        assert "NFQUEUE" not in rules and "-j REJECT --reject-with tcp-reset" in rules
    finally:
        (root / "go-1").touch()
        (root / "go-2").touch()
        build.join(timeout=120)
    second = (root / "done-2").read_text()
    assert not second.startswith("connected"), second
    assert [r["path"] for r in lab.host.requests()] == ["/step-1"]
    # What the stopped daemon left refusing in the namespace, cleanup finds and removes
    # (the daemon recorded the namespace by inode, cookie and a pid seen there).
    assert lab.leftovers() != []
    result = subprocess.run([sys.executable, "-m", "egress_monitor.cli", "cleanup"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "rules removed in 1 other network namespace(s)" in result.stdout, result.stdout
    assert lab.leftovers() == []
    daemon.start()  # the build is over: a new daemon finds nothing to keep refused


def test_two_namespaces_and_the_host_at_once_each_judged_by_its_own_decision(
        daemon: DaemonHandle, lab: Lab, workspace: Workspace, tmp_path: Path) -> None:
    """Three builds run at once: one in namespace A, one in namespace B, one in the host's.
    The policy allows A's test host from anywhere and H's only from the host's namespace
    (``netns: host``); B's is refused by default. What each test host received, and the
    events, say each build was judged by its own decision; every gate is gone after."""
    tag = os.getpid() % 10000
    with TestHost(f"{tag}-b", 60, tmp_path) as host_b, open_lab(host_b, "b") as lab_b, \
            TestHost(f"{tag}-h", 61, tmp_path) as host_h:
        daemon.restart(policy=f"""\
version: 1
mode: enforce
defaults: {{build-script: deny}}
rules:
  - {{id: a-ok, role: build-script, to: [{{cidrs: [{lab.host.v4}/32]}}], action: allow}}
  - {{id: h-ok, role: build-script, netns: host, to: [{{cidrs: [{host_h.v4}/32]}}],
     action: allow}}
""")
        runs = [(workspace, lab.host, _inside(lab)),
                (Workspace(tmp_path / "ws-b"), host_b, _inside(lab_b)),
                (Workspace(tmp_path / "ws-h"), host_h, None)]
        results: list[Any] = []
        threads = [threading.Thread(target=lambda w=w, h=h, wrap=wrap: results.append(
            w.cargo_build(h, "post4", wrap=wrap, check=False))) for w, h, wrap in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
        wait_until("three builds' ends", lambda: len(daemon.events("build_end")) == 3)
        ino_a, ino_b = os.stat(lab.path).st_ino, os.stat(lab_b.path).st_ino
        by_dst = {e["dst"]["ip"]: e for e in daemon.events("connection")
                  if _from_build_script(e) and e["dst"]["port"] == 8080}
        a, b, h = by_dst[lab.host.v4], by_dst[host_b.v4], by_dst[host_h.v4]
        assert (a["decision"], a["rule"], a["netns"]) == ("allow", "a-ok", ino_a)
        assert (b["decision"], b["rule"], b["netns"]) == ("deny", "default:build-script",
                                                          ino_b)
        assert (h["decision"], h["rule"], h.get("netns")) == ("allow", "h-ok", None)
        assert [r["path"] for r in lab.host.requests()] == ["/post4"]
        assert host_b.requests() == []
        assert [r["path"] for r in host_h.requests()] == ["/post4"]
        # Every gate gone: no rules, queues or listeners inside, no descriptor held.
        wait_until("both gates closed", lambda: lab.leftovers() == lab_b.leftovers() == [])
        assert daemon.proc is not None
        held = _net_fds(daemon.proc.pid)
        assert f"net:[{ino_a}]" not in held and f"net:[{ino_b}]" not in held, held


def test_a_restart_mid_build_regates_the_namespace_at_adoption(
        daemon: DaemonHandle, lab: Lab, workspace: Workspace) -> None:
    """A build runs in a namespace; the daemon restarts between its two connections. The
    new daemon adopts the build and re-opens the namespace's gate before the build does
    anything more (the previous one left refusing rules only); the second connection is
    judged (an event with the namespace) and refused by the new policy: nothing reaches
    the test host unjudged."""
    root = workspace.root
    done: list[Any] = []
    build = threading.Thread(target=lambda: done.append(workspace.cargo_build(
        lab.host, "steps=2", wrap=_inside(lab), check=False)))
    build.start()
    inode = os.stat(lab.path).st_ino
    try:
        (root / "go-1").touch()
        first = wait_until("step 1", lambda: (root / "done-1").exists()
                           and (root / "done-1").read_text(), timeout=120)
        assert first.startswith("connected HTTP/1.0 200")
        daemon.restart(policy="version: 1\nmode: enforce\n")
        wait_until("the adopted build's namespace gated", lambda: "adopted build" in
                   daemon.log() and f"gated network namespace {inode}" in
                   daemon.log().rpartition("adopted build")[2], timeout=30)
        (root / "go-2").touch()
        refused = daemon.wait_event("the second step", lambda e: e["type"] == "connection"
                                    and e["mode"] == "enforce" and e["dst"]["ip"] ==
                                    lab.host.v4)
        assert refused["decision"] == "deny" and refused["netns"] == inode
        # (Its crate is not asserted: an adopted build's processes come back without their
        # crate today, on the host too; not this test's subject.)
    finally:
        (root / "go-1").touch()
        (root / "go-2").touch()
        build.join(timeout=120)
    assert not (root / "done-2").read_text().startswith("connected HTTP/1.0 200")
    assert [r["path"] for r in lab.host.requests()] == ["/step-1"]
    wait_until("the build's end", lambda: daemon.events("build_end") != [])
    wait_until("the gate closed", lambda: lab.leftovers() == [])
