"""Containers started through an engine, as part of the build that asked (issue 11 item 3).

There is no container engine here. The stand-in engine is a Unix-socket listener run by the
test, outside every build, given to the daemon with ``--engine-socket``. Asked ``RUN MODE
TAG``, it does what an engine does: ``mkdir`` of a ``docker-<64 hex>.scope`` cgroup below a
test-made parent (given with ``--engine-cgroup``), then a process moved into it that runs in
another network namespace (the netns lab's: its only link is a veth to the test host) and
POSTs ``/TAG`` to the test host, then the answer ``started <id>``. MODE ``wait``: the
process waits on a FIFO the test opens once the daemon says the container's process is a
member (a real engine's container starts after its cgroup and namespace are set up); ``self``:
the process already runs in the namespace, moves itself into the cgroup and sends at once
(t=0). ``HOLD``: answer and keep the conversation open.

The build is the copied-python toolchain (test_identity.py, test_engine.py): cargo is a copy
of this Python registered with ``--cargo``, the build script a copy where cargo puts build
scripts (crate ``evil``). Each test checks what the test host received.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egress_monitor.enforce.cgroups import Cgroups
from tests.kernel.netlab import DaemonHandle, TestHost, copied_toolchain, running, wait_until
from tests.kernel.netns_lab import Lab as NetnsLab
from tests.kernel.netns_lab import open_lab

PYTHON = os.path.realpath(sys.executable)
ENV = {**os.environ, "PYTHONHOME": sys.base_prefix}

SENDER = r"""
import json, os, socket, sys, time
moved = 0
host, path, go, out, cgroup, hold, name = sys.argv[1:8]
if cgroup != "-":  # already in the namespace: into the container's cgroup (its cgroup.procs,
    # opened by the engine before `ip netns exec` remounted /sys, is fd 3), then send at once
    os.write(3, str(os.getpid()).encode())
moved = time.monotonic_ns()
if go != "-":
    with open(go) as f:  # a FIFO: blocks until the test opens it for writing
        f.read()
answered = None
if name != "-":  # a DNS query (A, recursion desired) to the host's port 53
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00\x00\x01\x00\x01"
    d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    d.settimeout(10)
    d.sendto(q, (host, 53))
    try:
        answered = d.recv(512)[:2] == b"\x12\x34"
    except OSError as e:
        answered = type(e).__name__
try:
    s = socket.create_connection((host, 8080), timeout=5)
    s.sendall(f"POST {path} HTTP/1.0\r\nContent-Length: 1\r\n\r\nx".encode())
    result = "ok" if s.recv(100).startswith(b"HTTP/1.0 200") else "cut-off"
except socket.timeout:
    result = "timeout"
except ConnectionResetError:
    result = "reset"
except OSError as e:
    result = type(e).__name__
with open(out + ".tmp", "w") as f:
    f.write(json.dumps({"result": result, "pid": os.getpid(), "moved_ns": moved,
                        "dns": answered}))
os.rename(out + ".tmp", out)
if hold != "-":  # stay until the test has seen what it needs (a FIFO, as above)
    with open(hold) as f:
        f.read()
"""

ENGINE = r"""
import hashlib, os, socket, subprocess, sys, time
sock, parent, ns, host, py, sender, work = sys.argv[1:8]
srv = socket.socket(socket.AF_UNIX)
srv.bind(sock)
srv.listen(16)
open(sock + ".ready", "w").close()
held = []
while True:
    conn, _ = srv.accept()
    f = conn.makefile("rwb")
    words = f.readline().decode().split()
    if words[:1] == ["HOLD"]:
        f.write(b"held\n"); f.flush()
        held.append((conn, f))
        continue
    if len(words) != 3 or words[0] != "RUN":
        conn.close()
        continue
    mode, tag = words[1], words[2]
    cid = hashlib.sha256(tag.encode()).hexdigest()
    cg = f"{parent}/docker-{cid}.scope"
    os.mkdir(cg)
    out = f"{work}/{tag}.out"
    inner = ["ip", "netns", "exec", ns, py, "-c", sender, host, "/" + tag]
    if mode == "self":
        go = f"{work}/{tag}.go"
        os.mkfifo(go)
        argv = ["sh", "-c", f'exec 3> {cg}/cgroup.procs && exec "$@"', "sh", *inner, "-",
                out, "3", go, "-"]
    else:
        go = "-"
        if mode.startswith("wait"):
            go = f"{work}/{tag}.go"
            os.mkfifo(go)
        name = "pkg.test.example" if mode == "waitdns" else "-"
        argv = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", *inner, go,
                out, "-", "-", name]
    subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    # As an engine does: answer once the container's process is in its cgroup.
    while "populated 1" not in open(cg + "/cgroup.events").read():
        time.sleep(0.005)
    f.write(f"started {cid}\n".encode()); f.flush()
    conn.close()
"""

# The build script: send one line to the engine at argv[1]; with argv[3], keep the
# conversation open until that file (a FIFO) is opened for writing.
CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
print("reply", s.makefile().readline().strip(), flush=True)
if len(sys.argv) > 3:
    open(sys.argv[3]).read()
"""

CARGO = r"""
import subprocess, sys
out = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=60)
print("script:", out.stdout.strip(), out.stderr.strip()[-300:])
"""


def cid_of(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


@dataclass
class Lab:
    cargo: Path
    build_script: Path
    socket: Path
    work: Path
    parent: str  # the test-made cgroup parent, relative to the mount
    netns: NetnsLab

    def outcome(self, tag: str) -> dict[str, Any]:
        out = self.work / f"{tag}.out"
        wait_until(f"the container {tag}'s outcome", out.exists, timeout=30)
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    def go(self, tag: str) -> None:
        with open(self.work / f"{tag}.go", "w") as f:
            f.write("go")

    def received(self, tag: str) -> list[dict[str, Any]]:
        return [r for r in self.netns.host.requests() if r.get("path") == f"/{tag}"]


@pytest.fixture
def lab(tmp_path: Path, test_host: TestHost) -> Iterator[Lab]:
    cargo, bs = copied_toolchain(tmp_path)
    work = tmp_path / "engine"
    work.mkdir()
    sock = work / "docker.sock"
    cgroups = Cgroups.discover()
    parent = cgroups.create("/", f"emt-engine-{os.getpid() % 10000}")
    try:
        with open_lab(test_host, "e") as netns, running(
                [PYTHON, "-c", ENGINE, str(sock), cgroups.mount + parent, netns.ns,
                 test_host.v4, PYTHON, SENDER, str(work)], env=ENV):
            wait_until("the stand-in engine", lambda: Path(str(sock) + ".ready").exists())
            try:
                yield Lab(cargo, bs, sock, work, parent, netns)
            finally:
                for fifo in work.glob("*.go"):  # nobody waits on a FIFO forever
                    with contextlib.suppress(OSError):
                        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                        os.close(fd)
                _remove_containers(cgroups, parent)
    finally:
        _remove_containers(cgroups, parent)
        with contextlib.suppress(OSError):
            cgroups.remove(parent)


def _empty(cgroups: Cgroups, rel: str) -> bool:
    return not cgroups.populated(rel)


def _remove_containers(cgroups: Cgroups, parent: str) -> None:
    for child in Path(cgroups.mount + parent).glob("docker-*.scope"):
        rel = f"{parent}/{child.name}"
        with contextlib.suppress(OSError):
            cgroups.kill(rel)
        wait_until("a container cgroup to empty", functools.partial(_empty, cgroups, rel),
                   timeout=10)
        with contextlib.suppress(OSError):
            cgroups.remove(rel)


def _start(daemon: DaemonHandle, lab: Lab, mode: str) -> None:
    daemon.restart("--cargo", str(lab.cargo), "--engine-socket", str(lab.socket),
                   "--engine-cgroup", lab.parent, policy=f"version: 1\nmode: {mode}\n")


def _build(lab: Lab, *script: str) -> subprocess.Popen[str]:
    """cargo runs the build script with ``script`` as its arguments (in the background)."""
    return subprocess.Popen([str(lab.cargo), "-c", CARGO, str(lab.build_script), "-c",
                             CLIENT, str(lab.socket), *script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _member_line(daemon: DaemonHandle, tag: str) -> re.Match[str]:
    pattern = re.compile(rf"pid (\d+) of container {cid_of(tag)} is a member of build (\S+) "
                         rf"\(([\d.]+) ms after its cgroup appeared; monotonic (\d+); ([\d.]+) ms")
    found: re.Match[str] = wait_until(f"container {tag} made a member",
                                      lambda: pattern.search(daemon.log()), timeout=20)
    return found


def _events_of(daemon: DaemonHandle, tag: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events("connection")
            if (e.get("container") or {}).get("id") == cid_of(tag)]


def _finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=60)
    assert "reply" in out, (out, err)
    return out


def test_a_container_the_build_asks_for_is_judged_as_the_build(daemon: DaemonHandle,
                                                                lab: Lab) -> None:
    """Audit mode. A container the stand-in starts for a process outside any build is
    untouched (no event, the POST arrives). One it starts for the build script: its process
    becomes a member, its namespace is gated, its POST is recorded with the build's id, the
    build script's role and crate, the container, the namespace and ``launched_by``."""
    _start(daemon, lab, "audit")
    with socket.socket(socket.AF_UNIX) as s:  # the outsider: this test, in no build
        s.connect(str(lab.socket))
        s.sendall(b"RUN now outside\n")
        assert s.makefile().readline().startswith("started")
    assert lab.outcome("outside")["result"] == "ok"
    assert len(lab.received("outside")) == 1
    build = _build(lab, "RUN waitdns inbuild")
    member = _member_line(daemon, "inbuild")
    lab.go("inbuild")
    outcome = lab.outcome("inbuild")
    assert outcome["result"] == "ok", outcome  # audit: nothing refused
    _finish(build)
    assert len(lab.received("inbuild")) == 1
    event = daemon.wait_event("the container's connection",
                              lambda e: e["type"] == "connection" and
                              (e.get("container") or {}).get("id") == cid_of("inbuild"))
    assert event["build"]["id"] == member.group(2), event
    assert event["role"] == "build-script" and event["crate"]["name"] == "evil", event
    assert event["container"]["runtime"] == "docker", event
    assert event["netns"] == os.stat(lab.netns.path).st_ino, event
    launched = event["launched_by"]
    assert launched["engine"] == "docker" and launched["role"] == "build-script", event
    assert launched["crate"] == "evil" and launched["pid"] > 0, event
    assert event["dst"]["port"] == 8080 and event["decision"] == "allow", event
    assert _events_of(daemon, "outside") == []
    # Its DNS query went to the daemon's listener inside (the host's port 53 is redirected),
    # and the record says where and who asked.
    assert outcome["dns"] is True, outcome
    query = daemon.wait_event("the container's DNS record", lambda e: e["type"] == "dns"
                              and e["query"]["name"] == "pkg.test.example")
    assert query["netns"] == event["netns"] and query["container"] == event["container"]
    assert query["launched_by"] == launched and query["role"] == "build-script", query
    # The container's process stays in its own cgroup: no tamper alert, nothing moved.
    assert [e for e in daemon.events("alert") if e["kind"] == "tamper"] == []
    assert daemon.metric("egress_monitor_engine_containers_total", outcome="tied") == 1
    print(f"MEASURED member {member.group(3)} ms after the cgroup appeared")


def test_enforce_refuses_the_container_and_the_host_gets_nothing(daemon: DaemonHandle,
                                                                  lab: Lab) -> None:
    """Enforce mode: the container's POST is refused under the build's policy and the test
    host receives nothing."""
    _start(daemon, lab, "enforce")
    build = _build(lab, "RUN wait refused")
    _member_line(daemon, "refused")
    lab.go("refused")
    assert lab.outcome("refused")["result"] != "ok"
    _finish(build)
    assert lab.received("refused") == [], "the test host received the container's POST"
    event = daemon.wait_event("the refused connection",
                              lambda e: e["type"] == "connection" and
                              (e.get("container") or {}).get("id") == cid_of("refused"))
    assert event["decision"] == "deny" and event["mode"] == "enforce", event
    assert event["launched_by"]["crate"] == "evil", event
    # The sinkhole's record of what it tried to send says where and who asked, too.
    sunk = daemon.wait_event("the sinkhole's record", lambda e: e["type"] == "alert" and
                             e["kind"] == "blocked_attempt" and
                             (e.get("container") or {}).get("id") == cid_of("refused"))
    assert sunk["netns"] == event["netns"] and sunk["launched_by"] == event["launched_by"]
    assert sunk["role"] == "build-script" and sunk["crate"]["name"] == "evil", sunk


def test_a_container_sending_at_once_gets_nothing_through_once_tied(daemon: DaemonHandle,
                                                                    lab: Lab) -> None:
    """The harshest start, in enforce mode: a process already running in the namespace moves
    itself into the container's cgroup and sends at once (t=0), before the daemon can have
    read the cgroup's processes. Once the daemon has tied the cgroup (its id in the kernel's
    ``cgroups``), the kernel makes such a process a member at its first socket, so nothing
    reaches the host. A process that moves in *before* the daemon has seen the cgroup
    appear (a few ms) is the window docs/netns.md names: then, and only then, its send may
    arrive unjudged (printed)."""
    _start(daemon, lab, "enforce")
    build = _build(lab, "RUN self tzero")
    outcome = lab.outcome("tzero")
    _finish(build)
    arrived = len(lab.received("tzero"))
    judged = _events_of(daemon, "tzero")
    member = _member_line(daemon, "tzero")  # made a member all the same, after its send
    lab.go("tzero")
    print(f"MEASURED t=0 send: outcome {outcome['result']}, host received {arrived}, "
          f"events {len(judged)}; member {(int(member.group(4)) - outcome['moved_ns']) / 1e6}"
          f" ms after it moved in ({member.group(5)} ms after cgroup.procs was read)")
    joined = wait_until("the cgroup joined in the kernel", lambda: re.search(
        rf"container {cid_of('tzero')}: cgroup \d+ joins build \S+ in the kernel "
        rf"\(monotonic (\d+)\)", daemon.log()), timeout=20)
    ahead_of_tie = outcome["moved_ns"] < int(joined.group(1))
    print(f"MEASURED moved in {(outcome['moved_ns'] - int(joined.group(1))) / 1e6:+.2f} ms "
          "from the kernel join")
    assert ahead_of_tie or arrived == 0, (judged, outcome)
    assert not (arrived and judged), (judged, outcome)


def test_two_builds_talking_to_the_engine_tie_the_container_to_none(daemon: DaemonHandle,
                                                                    lab: Lab) -> None:
    """Two builds have conversations open when the container appears: tied to neither,
    said in an alert to each build naming both, counted; its POST is no build's."""
    _start(daemon, lab, "audit")
    hold = lab.work / "hold"
    os.mkfifo(hold)
    first = _build(lab, "HOLD", str(hold))
    daemon.wait_event("the first build's engine alert",
                      lambda e: e["type"] == "alert" and e["kind"] == "container_engine")
    try:
        second = _build(lab, "RUN now amb")
        assert lab.outcome("amb")["result"] == "ok"
        _finish(second)
    finally:
        with open(hold, "w") as f:
            f.write("x")
    _finish(first)
    alerts = wait_until("the ambiguity alerts", lambda: [
        e for e in daemon.events("alert") if e["kind"] == "container_engine"
        and e["evidence"].get("tied") is False] or None)
    builds = {a["build"]["id"] for a in alerts}
    assert len(builds) == 2, alerts
    for alert in alerts:
        assert alert["evidence"]["why"] == "ambiguous", alert
        assert set(alert["evidence"]["candidates"]) == builds, alert
        assert alert["evidence"]["container"]["id"] == cid_of("amb"), alert
    assert daemon.metric("egress_monitor_engine_containers_total", outcome="ambiguous") == 1
    assert _events_of(daemon, "amb") == []
    assert len(lab.received("amb")) == 1
    assert "tied to none" in daemon.log()
