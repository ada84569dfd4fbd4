"""Forged stamps on the real kernel: a build member passing itself off as cargo.

The daemon takes a stamped packet's creator from its mark, so a member with CAP_NET_ADMIN
that set ``SO_MARK`` to cargo's stamp would be judged as cargo. Each test is the attacker: a
process cargo ran (a member, its parent the cargo whose stamp it forges) sets the stamp on its
socket or per datagram, and the test checks what the test host (or a loopback receiver)
actually received and what the kernel counted. The ``bpf`` fixture (test_bpf.py) proves
everything is detached and freed afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
from typing import Any

import pytest

from egress_monitor.bpf.owner import BpfOwner
from egress_monitor.bpf.programs import ROLE_CRATE, flow_key, member_value
from tests.kernel import test_bpf
from tests.kernel.netlab import TestHost, wait_until
from tests.kernel.test_bpf import CHILD, LAYOUT, PYTHON, _addr, detach_guard

bpf, cargo_file = test_bpf.bpf, test_bpf.cargo_file  # the fixtures, with their teardown checks


class Forger:
    """cargo (a member by exec of a registered cargo file) -> a child that sends for it,
    forging cargo's stamp on lines starting with ``forged`` (bpf_child.py ``send``)."""

    def __init__(self, cargo_file: str, forge: str, proto: str, family: str, src: str,
                 dst: str, port: int) -> None:
        env = dict(os.environ, EM_FORGE=forge, EM_FORGE_TAG=hex(LAYOUT.tag))
        self.proc = subprocess.Popen(
            [cargo_file, CHILD, "spawn", PYTHON, CHILD, proto, family, src, dst, str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.child = 0
        self.seen: dict[str, Any] = {}
        while not (self.child and self.seen):  # cargo's line and its child's, in either order
            line = self._line()
            if "child" in line:
                self.child = line["child"]
            else:
                self.seen = line

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        assert text, f"the forger stopped (exit {self.proc.poll()})"
        return dict(json.loads(text))

    def send(self, body: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(body + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        self.proc.communicate("", timeout=10)  # end of input: the child, then cargo, exit
        assert self.proc.returncode == 0


def _rcvbuf_after_large_setsockopt() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        large = struct.pack("=i", 65536).ljust(2 * os.sysconf("SC_PAGE_SIZE"), b"\0")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, large)
        return int(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def test_a_member_setting_so_mark_is_refused_and_other_options_are_not(
        bpf: BpfOwner, cargo_file: str) -> None:
    """``em_sockopt``: a process cargo ran can neither take cargo's stamp nor clear its own
    (EPERM, counted in ``mark_refused``); its other options, an optval larger than a page
    among them, work as without the program."""
    refused = bpf.stats()["mark_refused"]
    proc, first = test_bpf._start([cargo_file, CHILD, "spawn", PYTHON, CHILD, "sockopt",
                                   hex(LAYOUT.tag)])
    assert proc.stdout is not None
    try:
        second = json.loads(proc.stdout.readline())  # cargo's line and its child's, any order
        seen, got = (first, second) if "child" in first else (second, first)
        assert got["pid"] == seen["child"] and bpf.member(got["pid"]) is not None
        assert (got["forged"], got["clear"]) == (errno.EPERM, errno.EPERM)
        assert got["mark"] == got["now"] == LAYOUT.stamp(got["pid"])
        assert got["rcvbuf"] == _rcvbuf_after_large_setsockopt()
        assert bpf.stats()["mark_refused"] == refused + 2
    finally:
        test_bpf._finish(proc)


@pytest.mark.parametrize("proto, family, forge", [
    ("udp", "4", "setsockopt"), ("tcp", "4", "setsockopt"), ("tcp", "6", "setsockopt"),
    ("udp", "6", "cmsg"), ("udp", "4", "cmsg")])
def test_a_member_forging_cargos_stamp_never_reaches_the_host_even_with_a_verdict(
        bpf: BpfOwner, cargo_file: str, test_host: TestHost, proto: str, family: str,
        forge: str) -> None:
    """The daemon, taken in by the stamp, wrote the flow's verdict: the forged packets are
    still dropped in the kernel (counted in ``mark_forged``), while the same socket under its
    own stamp, with the same verdict, gets through."""
    if forge == "setsockopt":
        detach_guard(bpf)
    src, dst = ((test_host.local_v4, test_host.v4) if family == "4"
                else (test_host.local_v6, test_host.v6))
    port = 5353 if proto == "udp" else 8080
    f = Forger(cargo_file, forge, proto, family, src, dst, port)
    try:
        assert f.seen["mark"] == LAYOUT.stamp(f.child) and bpf.member(f.child) is not None
        assert f.seen["forged_mark"] == LAYOUT.stamp(f.proc.pid)  # cargo's stamp
        bpf.allow_flow(flow_key(int(family), 17 if proto == "udp" else 6, _addr(family, src),
                                _addr(family, dst), f.seen["port"], port))
        before = bpf.stats()
        assert "error" in f.send("forged")  # the kernel refused the send (UDP) or the SYN
        after = bpf.stats()
        assert after["mark_forged"] > before["mark_forged"]
        assert after["backstop_dropped"] == before["backstop_dropped"]  # the key was there
        assert f.send("honest") == {"sent": "honest", "mark": LAYOUT.stamp(f.child)}
        key = "body" if proto == "udp" else "path"
        wait_until("the honest packet at the host",
                   lambda: any(r.get(key, "").endswith("honest") for r in test_host.requests()))
    finally:
        f.close()
    assert not any("forged" in (r.get("body", "") + r.get("path", ""))
                   for r in test_host.requests())


@pytest.mark.parametrize("forge", ["setsockopt", "cmsg"])
def test_a_forged_stamp_is_dropped_on_loopback_too(bpf: BpfOwner, cargo_file: str,
                                                   forge: str) -> None:
    """Loopback needs no verdict (the daemon's resolver and sinkhole are there), but a forged
    stamp is checked first: the receiver's first datagram is the honest one."""
    if forge == "setsockopt":
        detach_guard(bpf)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(10)
        f = Forger(cargo_file, forge, "udp", "4", "127.0.0.1", "127.0.0.1",
                   rx.getsockname()[1])
        try:
            forged = bpf.stats()["mark_forged"]
            assert "error" in f.send("forged")
            assert bpf.stats()["mark_forged"] > forged
            assert f.send("honest")["sent"] == "honest"
            assert rx.recv(100) == b"honest"
        finally:
            f.close()


def test_a_non_member_carrying_our_tag_is_untouched(bpf: BpfOwner,
                                                    test_host: TestHost) -> None:
    """Not a member (no socket storage): a stamp-like mark is neither checked nor refused,
    and its datagram needs no verdict; a large optval is passed through."""
    before = bpf.stats()
    assert _rcvbuf_after_large_setsockopt() > 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK,
                     struct.pack("=I", LAYOUT.stamp(os.getppid())))
        s.sendto(b"outsider", (test_host.v4, 5353))
        s.sendmsg([b"outsider-cmsg"], [(socket.SOL_SOCKET, socket.SO_MARK,
                                        struct.pack("=I", LAYOUT.stamp(1)))], 0,
                  (test_host.v4, 5353))
    wait_until("the outsider's datagrams",
               lambda: {"outsider", "outsider-cmsg"} <= {r.get("body") for r in
                                                         test_host.requests()})
    after = bpf.stats()
    assert after["mark_forged"] == before["mark_forged"]
    assert after["mark_refused"] == before["mark_refused"]


REUSE = r"""
import json, socket, sys
src, dst, tag = sys.argv[1], sys.argv[2], sys.argv[3]
sys.stdin.readline()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind((src, 47000))
try:
    s.sendto(tag.encode(), (dst, 5353))
    print(json.dumps({"sent": tag}), flush=True)
except OSError as e:  # the kernel's drop, seen by the sender
    print(json.dumps({"error": e.errno}), flush=True)
sys.stdin.readline()
"""


def test_a_flow_judged_for_one_process_carries_no_other(bpf: BpfOwner,
                                                        test_host: TestHost) -> None:
    """Two members of a build share a UDP source port (SO_REUSEPORT). The daemon judged the
    first one's flow and wrote its verdict for that creator; conntrack keeps the flow
    established, so the second one's datagrams on the same ports would never be queued. The
    backstop drops them (counted in ``flow_reused``); the first one's still pass."""
    procs = []
    try:
        for tag in ("judged", "riding"):
            proc = subprocess.Popen([PYTHON, "-c", REUSE, test_host.local_v4, test_host.v4, tag],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            bpf.set_member(proc.pid, member_value(9, ROLE_CRATE))
        bpf.allow_flow(flow_key(4, 17, _addr("4", test_host.local_v4), _addr("4", test_host.v4),
                                47000, 5353), creator=procs[0].pid)
        before = bpf.stats()["flow_reused"]
        said = []
        for proc in procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            said.append(json.loads(proc.stdout.readline()))
        assert said == [{"sent": "judged"}, {"error": errno.EPERM}]
        wait_until("the judged datagram at the host", lambda: any(
            r.get("body") == "judged" for r in test_host.requests()))
        assert bpf.stats()["flow_reused"] == before + 1
    finally:
        for proc in procs:
            proc.communicate("\n", timeout=10)
    assert not any(r.get("body") == "riding" for r in test_host.requests())
