"""The real daemon and real cargo builds in another network namespace (issue 11).

The "container" is a namespace whose only link leads to the test host (``netns_lab``); cargo
runs wholly inside it (``ip netns exec``), as a container job's would. The daemon runs in the
host's namespace and must open the namespace's gate itself: what reached the test host and
what the events say are checked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.netlab import DaemonHandle, TestHost, Workspace
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
