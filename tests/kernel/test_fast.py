"""The SYN ahead (bpf/fast.py), tried as a build would: forged marks, other processes, data in
the SYN, a judgment that changed since.

A process's repeat connection to a destination the daemon allowed it sends its SYN at once;
the daemon judges the connection at its next packet. Each test checks what the test host
received: every SYN reaching it is counted by a rule in its own namespace, every request by
its recorder.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egress_monitor.bpf import syscalls
from egress_monitor.bpf.fast import fast_key
from egress_monitor.bpf.owner import BpfOwner
from egress_monitor.bpf.programs import ROLE_CRATE, member_value
from tests.kernel.netlab import DaemonHandle, TestHost, copied_toolchain, running, sh, wait_until
from tests.kernel.test_bpf import LAYOUT, bpf, detach_guard  # noqa: F401 - the fixture
from tests.kernel.test_relays import SECRET
from tests.kernel.test_relays import TFO as RELAYS_TFO

PYTHON = os.path.realpath(sys.executable)
ALLOW = """\
version: 1
mode: enforce
groups:
  lab: {{cidrs: ['{v4}/32', '{v6}/128'], ports: [8080, 8443]}}
rules:
  - {{id: lab, role: {role}, to: [lab], action: allow}}
"""


@pytest.fixture
def syns(test_host: TestHost) -> Iterator[SynCount]:
    """Counts the TCP SYNs that reach the test host (a rule in its namespace, gone with it)."""
    counter = SynCount(test_host.ns)
    yield counter


class SynCount:
    """TCP SYNs to a port of the test host, both families."""

    TOOLS = ("iptables", "ip6tables")

    def __init__(self, ns: str) -> None:
        self.ns = ns
        for tool in self.TOOLS:
            for port in (8080, 8443):
                sh("ip", "netns", "exec", ns, tool, "-w", "-A", "INPUT", "-p", "tcp", "--syn",
                   "--dport", str(port))

    def __call__(self, port: int) -> int:
        total = 0
        for tool in self.TOOLS:
            out = sh("ip", "netns", "exec", self.ns, tool, "-w", "-nvxL", "INPUT").stdout
            rows = [line for line in out.splitlines()
                    if re.search(rf"\btcp dpt:{port}\b", line) and "flags:" in line]
            assert len(rows) == 1, f"no SYN counter for port {port}:\n{out}"
            total += int(rows[0].split()[0])
        return total


def _build(daemon: DaemonHandle, code: str, *args: str,
           env: dict[str, str] | None = None) -> list[Any]:
    """Run Python code as a build; its stdout's JSON lines."""
    out = subprocess.run(daemon.exec_argv(sys.executable, "-c", code, *args), env=env,
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def _connections(daemon: DaemonHandle, n: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = wait_until(
        f"{n} connection events", lambda: len(got := daemon.events("connection")) >= n and got)
    return found


GETS = r"""
import json, socket, sys
for family, host, n in ((socket.AF_INET, sys.argv[1], 5), (socket.AF_INET6, sys.argv[2], 3)):
    for i in range(n):
        path = f"/ahead-{family}-{i}"
        with socket.socket(family) as s:
            s.settimeout(5)
            s.connect((host, 8080))
            s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            print(json.dumps({"path": path, "reply": s.recv(12).decode()}))
"""


def test_repeat_connections_send_their_syn_ahead_and_are_all_judged(
        daemon: DaemonHandle, test_host: TestHost, syns: SynCount) -> None:
    """The first connection of each family is judged at its SYN; the repeats send theirs
    ahead and are judged at the handshake's end: each is recorded, allowed, and arrives."""
    daemon.restart(policy=ALLOW.format(v4=test_host.v4, v6=test_host.v6, role="other"))
    out = _build(daemon, GETS, test_host.v4, test_host.v6)
    assert [o["reply"][:8] for o in out] == ["HTTP/1.0"] * 8
    arrived = {r["path"] for r in test_host.requests()}
    assert arrived == {o["path"] for o in out}
    conns = _connections(daemon, 8)
    assert [(c["decision"], c["identity"]) for c in conns] == [("allow", "kernel")] * 8
    ahead = [bool(c.get("syn_ahead")) for c in conns]
    assert ahead == [False, True, True, True, True, False, True, True], ahead
    assert syns(8080) == 8


ATTEMPT = r"""
import json, socket, struct, sys
host, mark, tag, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
sys.stdin.readline()
s = socket.socket()
if mark:
    own = s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) & 0x3FFFFF
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, struct.pack("I", mark | own))
s.settimeout(1.5)
try:
    s.connect((host, port))
    s.sendall(b"GET /" + tag.encode() + b" HTTP/1.0\r\n\r\n")
    print(json.dumps({"got": s.recv(12).decode()}))
except OSError as e:
    print(json.dumps({"error": type(e).__name__}))
"""


def test_a_forged_fast_mark_opens_nothing(bpf: BpfOwner, test_host: TestHost,  # noqa: F811
                                          syns: SynCount) -> None:
    """The kernel alone (no daemon, no rules): a member that sets the fast bit itself (root,
    with the SO_MARK guard detached) and a non-member that carries our tag and the fast bit
    get no SYN out; a member whose destination was allowed ahead gets its SYN out and
    nothing after it (no verdict for the flow), and nothing at all once the daemon's lease
    lapsed (a daemon killed outright renews nothing) or before it was ever given."""
    detach_guard(bpf)

    def attempt(member: bool, mark: int, allowed: bool, tag: str,
                port: int = 8080) -> dict[str, Any]:
        with running([PYTHON, "-c", ATTEMPT, test_host.v4, str(mark), tag, str(port)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
            if member:
                bpf.set_member(proc.pid, member_value(5, ROLE_CRATE))
            if allowed:
                bpf.allow_fast(fast_key(proc.pid, 4, socket.inet_aton(test_host.v4), port))
            out, _ = proc.communicate(b"go\n", timeout=30)
            result: dict[str, Any] = json.loads(out)
            return result

    forged = bpf.stats()["mark_forged"]
    # A member's own SO_MARK with the fast bit: no record in its socket's storage.
    assert attempt(True, LAYOUT.tag | LAYOUT.fast, False, "forged-member") == {
        "error": "TimeoutError"}
    # Not a member, our tag and the fast bit: dropped as forged.
    assert attempt(False, LAYOUT.tag | LAYOUT.fast, False, "forged-outsider") == {
        "error": "TimeoutError"}
    assert bpf.stats()["mark_forged"] > forged
    assert syns(8080) == 0, "a forged fast mark got a SYN out"
    dropped = bpf.stats()["backstop_dropped"]
    # Allowed ahead, but no lease yet (a fresh owner's is 0): nothing leaves.
    assert attempt(True, 0, True, "ahead-no-lease") == {"error": "TimeoutError"}
    assert syns(8080) == 0, "a SYN went ahead without the daemon's lease"
    # Allowed ahead under a lease: the SYN (and its retransmissions) leaves, the ACK and
    # request do not.
    bpf.renew_ahead(time.monotonic_ns() + 60 * 10**9)
    result = attempt(True, 0, True, "ahead-no-verdict")
    assert "got" not in result, result
    sent = syns(8080)
    assert sent >= 1
    assert bpf.stats()["backstop_dropped"] > dropped
    # The lease lapsed: the same allowance sends nothing ahead any more.
    bpf.renew_ahead(time.monotonic_ns() - 1)
    assert attempt(True, 0, True, "ahead-lapsed") == {"error": "TimeoutError"}
    assert syns(8080) == sent, "a SYN went ahead after the lease lapsed"
    assert test_host.requests() == []


GET = r"""
def get(tag):  # one request to host:8080; the reply's first 8 bytes, or what went wrong
    try:
        with socket.create_connection((host, 8080), timeout=5) as s:
            s.sendall(f"GET /{tag} HTTP/1.0\r\n\r\n".encode())
            return s.recv(12).decode()[:8] or "cut-off"
    except OSError as e:
        return type(e).__name__
"""
TOOLCHAIN_GETS = r"""
import json, socket, subprocess, sys
host, script = sys.argv[1], sys.argv[2]
""" + GET + r"""
who = sys.argv[3] if len(sys.argv) > 3 else "cargo"
print(json.dumps([get(who + "-1"), get(who + "-2")]), flush=True)
if who == "cargo":  # cargo runs its build script, which runs this too
    subprocess.run([script, __file__, host, script, "script"], check=True)
"""


def test_only_the_process_allowed_sends_ahead(daemon: DaemonHandle, test_host: TestHost,
                                              syns: SynCount, tmp_path: Path) -> None:
    """cargo (a registered toolchain file) is allowed the test host; the build script it
    runs is not. After cargo's own repeat went ahead, the build script's connections to
    the same address and port are judged at their SYN and refused: none reaches the host."""
    cargo, script = copied_toolchain(tmp_path)
    code = tmp_path / "gets.py"
    code.write_text(TOOLCHAIN_GETS)
    daemon.restart("--cargo", str(cargo),
                   policy=ALLOW.format(v4=test_host.v4, v6=test_host.v6, role="cargo"))
    out = subprocess.run([str(cargo), str(code), test_host.v4, str(script)],
                         capture_output=True, text=True, timeout=90,
                         env={**os.environ, "PYTHONHOME": sys.base_prefix})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[0]) == ["HTTP/1.0", "HTTP/1.0"]
    conns = _connections(daemon, 4)
    by_role = {(c["role"], bool(c.get("syn_ahead")), c["decision"]) for c in conns}
    assert by_role == {("cargo", False, "allow"), ("cargo", True, "allow"),
                       ("build-script", False, "deny")}, conns
    assert {r["path"] for r in test_host.requests()} == {"/cargo-1", "/cargo-2"}
    assert syns(8080) == 2  # the build script's were sinkholed before leaving


# One plain connection first (allowed: the next goes ahead), then test_relays' Fast Open.
TFO = r"""
import socket, sys
with socket.create_connection((sys.argv[1], 8443), timeout=5) as s:
    s.sendall(b"hello")
""" + RELAYS_TFO


def test_data_in_a_syn_sent_ahead_never_leaves_unjudged(daemon: DaemonHandle,
                                                        test_host: TestHost,
                                                        syns: SynCount) -> None:
    """TCP Fast Open to a destination allowed ahead, carrying a secret: the SYN with data is
    dropped in the kernel, the bare SYN retransmitted, and the data judged as first data
    after the handshake: refused in enforce mode, and the host never sees the secret."""
    daemon.restart(policy=ALLOW.format(v4=test_host.v4, v6=test_host.v6, role="other"))
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET}
    out = subprocess.run(daemon.exec_argv(sys.executable, "-c", TFO, test_host.v4,
                                          f"key={SECRET}"), env=env, capture_output=True,
                         text=True, timeout=90, check=True).stdout.strip()
    assert out == "cut off"
    alert = daemon.wait_event("the secret's alert", lambda e: e["type"] == "alert"
                              and e["kind"] == "secret_value")
    assert alert["blocked"] is True
    raw = [r for r in test_host.requests() if r["proto"] == "raw"]
    assert all(SECRET not in json.dumps(r) for r in raw), raw
    assert [r.get("syn_data") for r in raw] == [False], raw  # only the first, plain one
    # Whichever way the kernel sent it (data in the SYN, which no connect hook sees on this
    # kernel, so it is judged in the queue; or, once it has marked the destination as losing
    # SYN data, after a handshake sent ahead), the data was judged before it left.
    conns = _connections(daemon, 2)
    assert [c["dst"]["port"] for c in conns] == [8443, 8443], conns


SHORT = r"""
import json, os, socket, sys, time
import dns.message, dns.query
host, go = sys.argv[1], sys.argv[2]
addr = dns.query.udp(dns.message.make_query("short.test.example", "A"), host,
                     timeout=5).answer[0][0].address
host = addr  # get() connects to the address the name gave
""" + GET + r"""
print(json.dumps([get("named-1"), get("named-2")]), flush=True)
while not os.path.exists(go):
    time.sleep(0.02)
print(json.dumps(get("expired")))
"""


def test_a_connection_sent_ahead_is_judged_again(daemon: DaemonHandle, test_host: TestHost,
                                                 syns: SynCount, tmp_path: Path) -> None:
    """Allowed by name: once the name's answer has expired, a repeat's SYN still goes ahead
    but the judgment at its handshake's end refuses it; the host gets no request."""
    test_host.start_dns()
    daemon.restart("--dns-upstream", test_host.v4, "--dns-min-ttl", "1", "--dns-ttl-overlap",
                   "1", policy="version: 1\nmode: enforce\nrules:\n  - id: short\n"
                   "    role: other\n    to: [{hosts: [short.test.example], ports: [8080]}]\n"
                   "    action: allow\n")
    go = tmp_path / "go"
    with running(daemon.exec_argv(sys.executable, "-c", SHORT, test_host.v4, str(go)),
                 stdout=subprocess.PIPE, text=True) as build:
        assert build.stdout is not None
        assert json.loads(build.stdout.readline()) == ["HTTP/1.0", "HTTP/1.0"]
        wait_until("the name to expire", lambda: daemon.metric(
            "egress_monitor_dns_knowledge_entries") == 0, timeout=15)
        go.touch()
        assert json.loads(build.stdout.readline()) != "HTTP/1.0"
        assert build.wait(timeout=30) == 0
    conns = _connections(daemon, 3)
    assert [(c["decision"], bool(c.get("syn_ahead"))) for c in conns] == [
        ("allow", False), ("allow", True), ("deny", True)], conns
    assert conns[2]["dst"]["names"] == []
    assert {r["path"] for r in test_host.requests()} == {"/named-1", "/named-2"}
    assert syns(8080) == 3


BURST = r"""
import json, socket, sys
for i in range(int(sys.argv[2])):
    socket.create_connection((sys.argv[1], 9000), timeout=5).close()
print(json.dumps("done"))
"""
ACCEPT_CLOSE = r"""
import socket, sys
srv = socket.create_server((sys.argv[1], 9000), backlog=1024)
print("ready", flush=True)
while True:
    srv.accept()[0].close()
"""


def test_a_burst_sent_ahead_then_an_exit_loses_no_connection(daemon: DaemonHandle,
                                                             test_host: TestHost) -> None:
    """A process opens 600 connections as fast as it can (their SYNs go ahead, so it runs
    far ahead of the daemon's judgments) and exits: the build ends only after the daemon has
    judged what it still held, so every connection has its event."""
    n = 600
    with running(["ip", "netns", "exec", test_host.ns, PYTHON, "-c", ACCEPT_CLOSE,
                  test_host.v4], stdout=subprocess.PIPE) as peer:
        assert peer.stdout is not None and peer.stdout.readline().strip() == b"ready"
        daemon.restart(policy=ALLOW.format(v4=test_host.v4, v6=test_host.v6, role="other")
                       .replace("8080, 8443", "9000"))
        assert _build(daemon, BURST, test_host.v4, str(n)) == ["done"]
        daemon.wait_event("the build's end", lambda e: e["type"] == "build_end")
    conns = daemon.events("connection")
    assert len(conns) == n and all(c["decision"] == "allow" for c in conns)
    # The first is judged at its SYN; the key for the rest is written just after that
    # verdict, so a connect or two may still race it.
    assert not conns[0].get("syn_ahead")
    assert sum(1 for c in conns if c.get("syn_ahead")) >= n - 5
    assert daemon.metric("egress_monitor_unattributed_packets_total",
                         reason="no_build") == 0


def _daemon_map(name: str) -> int:
    """A descriptor for the daemon's map of that name, found by id as a root build would."""
    for map_id in syscalls.ids("map"):
        try:
            fd = syscalls.map_fd_by_id(map_id)
        except OSError:
            continue
        if syscalls.map_name(fd) == name:
            return fd
        os.close(fd)
    raise AssertionError(f"no map {name}")


def test_keys_written_into_the_fast_map_by_someone_else_are_removed(
        daemon: DaemonHandle, test_host: TestHost) -> None:
    """A root build writes its own key into the daemon's ``fast`` map (bpf(2) by map id) to
    send SYNs ahead to a destination nobody allowed: within a second the key is gone and a
    ``tamper`` alert names what was found."""
    daemon.restart(policy=ALLOW.format(v4=test_host.v4, v6=test_host.v6, role="other"))
    fd = _daemon_map("em_fast")
    try:
        key = fast_key(4242, 4, socket.inet_aton("192.0.2.9"), 443)
        syscalls.map_update(fd, key, struct.pack("=Q", 0))
        alert = daemon.wait_event("the tamper alert", lambda e: e["type"] == "alert"
                                  and e["evidence"].get("tamper") == "fast_map", timeout=10)
        assert alert["evidence"]["creators"] == [4242] and alert["evidence"]["keys"] == 1
        assert syscalls.map_lookup(fd, key, 8) is None
    finally:
        os.close(fd)
