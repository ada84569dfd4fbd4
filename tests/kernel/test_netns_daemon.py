"""The real daemon and real cargo builds in another network namespace (issue 11).

The "container" is a namespace whose only link leads to the test host (``netns_lab``); cargo
runs wholly inside it (``ip netns exec``), as a container job's would. The daemon runs in the
host's namespace and must open the namespace's gate itself: what reached the test host and
what the events say are checked.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.netlab import DaemonHandle, TestHost, Workspace, wait_until
from tests.kernel.netns_lab import Lab, lab

__all__ = ["lab"]  # the fixture


def _inside(lab: Lab) -> Any:
    return lambda argv: ["ip", "netns", "exec", lab.ns, *argv]


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
    daemon.start()  # the build is over: a new daemon finds nothing to keep refused
