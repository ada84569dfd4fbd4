"""A build's gate inside another network namespace, on the real kernel (no daemon).

The "container" is a network namespace the test makes, whose only link (a veth) leads to the
test host; the "build" is a process in a test cgroup running inside it. Each test opens a
:class:`NetnsGate` there and checks, as the sending process and as the test host see it, that
the namespace's traffic now goes through the gate: queued on the gate's own queue socket
(the test reads it and gives the verdicts), DNS answered by the resolver's listener inside,
refused connections taken by the sinkhole inside; and that ``close()`` leaves nothing in the
namespace or in this process. Also: the BPF ``sock_create`` program reports the namespaces
members make sockets in.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rrset
import pytest

from egress_monitor.bpf.marks import MarkLayout
from egress_monitor.bpf.owner import BpfOwner
from egress_monitor.bpf.programs import ROLE_CRATE, flow_key, member_value
from egress_monitor.dns.server import DnsServer, Plan
from egress_monitor.enforce.cgroups import Cgroups
from egress_monitor.enforce.netns import NetnsGate, cookie_of, open_netns
from egress_monitor.enforce.rules import SINK_MARK, BuildRule
from egress_monitor.enforce.sinkhole import Sinkhole
from egress_monitor.events import QueuedPacket
from egress_monitor.packets import parse_flow
from egress_monitor.sources.nfqueue import NF_ACCEPT, NF_DROP, NF_REPEAT
from tests.kernel.netlab import sh, wait_until
from tests.kernel.netns_lab import SENDER, Lab, lab

__all__ = ["lab"]  # the fixture
QUEUE = 7
ANSWER = "198.51.100.77"  # the test resolver's answer: only data, never connected to



def _ns_fds() -> list[str]:
    """This process's descriptors on network namespaces."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("net:"):
                out.append(fd)
    return out


@dataclass
class Verdicts:
    """A thread that reads the gate's queue socket and answers each packet with ``decide``."""

    gate: NetnsGate
    decide: Callable[[QueuedPacket], tuple[int, int | None]]
    seen: list[tuple[str, int, int, bytes]] = field(default_factory=list)  # proto, port, verdict
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        queue = self.gate.queue
        assert queue is not None
        while not self._stop.is_set():
            ready, _, _ = select.select([queue], [], [], 0.05)
            if not ready:
                continue
            for packet in queue.read():
                verdict, mark = self.decide(packet)
                flow = parse_flow(packet.payload)
                self.seen.append((flow.protocol.value, flow.dst_port, verdict, packet.payload))
                queue.verdict(packet.queue, packet.packet_id, verdict, mark)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _udp_payload(packet: bytes) -> bytes:
    version = packet[0] >> 4
    start = (packet[0] & 0xF) * 4 if version == 4 else 40
    return packet[start + 8:]


def test_traffic_inside_is_queued_on_the_gates_socket_and_its_verdicts_decide(
        lab: Lab) -> None:
    def decide(packet: QueuedPacket) -> tuple[int, int | None]:
        flow = parse_flow(packet.payload)
        if flow.protocol.value == "udp":
            return (NF_DROP if _udp_payload(packet.payload) == b"refused" else NF_ACCEPT), None
        return NF_ACCEPT, None

    assert not lab.lo_up()  # a fresh namespace: the gate must bring lo up itself
    fds_before = _ns_fds()
    started = time.monotonic()
    gate = NetnsGate.open(lab.path, [BuildRule(lab.cgroup, QUEUE)], dns_port=None,
                          sink_port=None)
    opened_ms = (time.monotonic() - started) * 1000
    verdicts = Verdicts(gate, decide)
    try:
        assert gate.inode == os.stat(lab.path).st_ino
        assert lab.lo_up()
        assert QUEUE in {int(line.split()[0]) for line in
                         lab.ns_sh("cat", "/proc/net/netfilter/nfnetlink_queue").splitlines()}
        outcome = lab.send("udp4:allowed", "udp4:refused", "udp6:allowed6", "tcp4:/inside",
                           "tcp6:/inside6")
    finally:
        verdicts.stop()
        errors = gate.close()
    assert errors == []
    assert outcome == {"udp4:allowed": "echo", "udp4:refused": "timeout",
                       "udp6:allowed6": "echo", "tcp4:/inside": "ok", "tcp6:/inside6": "ok"}
    got = lab.host.requests()
    assert {r.get("path") or r.get("data") for r in got} >= {"/inside", "/inside6"}
    assert not any("refused" in json.dumps(r) for r in got)  # dropped: never at the host
    queued = {(proto, port) for proto, port, _v, _p in verdicts.seen}
    assert {("udp", 5353), ("tcp", 8080)} <= queued  # every flow was judged on this socket
    assert sum(1 for proto, _port, v, _p in verdicts.seen if proto == "udp"
               and v == NF_DROP) == 1
    assert lab.leftovers() == []
    assert not lab.lo_up()  # as the gate found it
    assert lab.ns_sh("cat", "/proc/sys/net/netfilter/nf_conntrack_acct").strip() == "0"
    assert _ns_fds() == fds_before
    print(f"gate open: {opened_ms:.1f} ms")


class _Resolver:
    """The daemon's side of the resolver, for the test: answers every A query with ANSWER."""

    def __init__(self) -> None:
        self.queries: list[tuple[str, str, str]] = []  # name, client address, transport

    def begin(self, wire: bytes, client: tuple[str, int], transport: str) -> Plan:
        query = dns.message.from_wire(wire)
        self.queries.append((str(query.question[0].name), client[0], transport))
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A",
                                                   ANSWER))
        return Plan(respond=response.to_wire())

    def complete(self, context: Any, response: bytes | None, upstream: str | None,
                 latency_s: float) -> None:
        raise AssertionError("nothing is forwarded")


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ask_host_listener(port: int) -> list[str]:
    answer = dns.query.udp(dns.message.make_query("host.test.example", "A"), "127.0.0.1",
                           port=port, timeout=5)
    return [r.address for rrset in answer.answer for r in rrset]


def test_dns_from_inside_is_answered_by_the_resolver_and_refusals_reach_the_sinkhole(
        lab: Lab) -> None:
    hooks = _Resolver()
    server = DnsServer(hooks, _free_port(socket.SOCK_DGRAM), upstreams=[])
    attempts: list[tuple[tuple[str, int] | None, bytes]] = []
    sinkhole = Sinkhole(_free_port(socket.SOCK_STREAM),
                        lambda _peer, dst, data: attempts.append((dst, data)))
    server.start()
    sinkhole.start()

    def decide(packet: QueuedPacket) -> tuple[int, int | None]:
        # TCP to the host is refused to the sinkhole, as the daemon refuses in enforce mode.
        flow = parse_flow(packet.payload)
        if flow.protocol.value == "tcp" and flow.dst_port == 8080:
            return NF_REPEAT, SINK_MARK
        return NF_ACCEPT, None

    try:
        gate = NetnsGate.open(lab.path, [BuildRule(lab.cgroup, QUEUE)],
                              dns_port=server.port, sink_port=sinkhole.port, dns=server,
                              sinkhole=sinkhole)
        verdicts = Verdicts(gate, decide)
        try:
            outcome = lab.send("dnsu4:pkg.test.example", "dnst4:tcp.test.example",
                               "dnsu6:six.test.example", "tcp4:/refused")
        finally:
            verdicts.stop()
            assert gate.close() == []
        # The host's own listeners are still served: adding and removing the namespace's
        # sockets left them alone.
        direct = _ask_host_listener(server.port)
    finally:
        sinkhole.stop()
        server.stop()
    assert outcome == {"dnsu4:pkg.test.example": [ANSWER], "dnst4:tcp.test.example": [ANSWER],
                       "dnsu6:six.test.example": [ANSWER], "tcp4:/refused": "reset"}
    assert {(name, transport) for name, _client, transport in hooks.queries} >= {
        ("pkg.test.example.", "udp"), ("tcp.test.example.", "tcp"),
        ("six.test.example.", "udp")}
    # The client is the address the query left from in the namespace (REDIRECT keeps the
    # source): an address of another namespace, which the host may not even have.
    assert {client for name, client, _t in hooks.queries if name != "host.test.example."} \
        == {lab.host.local_v4, lab.host.local_v6}
    assert direct == [ANSWER]
    # DNS was answered inside: never queued, and nothing on port 53 reached the host.
    assert all(port != 53 for _proto, port, _v, _p in verdicts.seen)
    assert attempts and attempts[0][0] == (lab.host.v4, 8080)
    assert attempts[0][1].startswith(b"POST /refused")
    assert not any(r.get("path") == "/refused" for r in lab.host.requests())
    assert lab.leftovers() == []


def test_a_namespace_whose_name_and_processes_are_gone_closes_cleanly(lab: Lab) -> None:
    fds_before = _ns_fds()
    with subprocess.Popen(["ip", "netns", "exec", lab.ns, "sleep", "60"]) as proc:
        pid_ns = f"/proc/{proc.pid}/ns/net"
        wait_until("the process to be inside",
                   lambda: os.stat(pid_ns).st_ino == os.stat(lab.path).st_ino)
        gate = NetnsGate.open(pid_ns, [BuildRule(lab.cgroup, QUEUE)], dns_port=5300,
                              sink_port=5301)
        proc.kill()
    sh("ip", "netns", "del", lab.ns)
    assert not os.path.exists(lab.path)
    assert gate.close() == []
    assert gate.close() == []  # twice is harmless
    assert _ns_fds() == fds_before


def test_open_that_fails_undoes_every_step(lab: Lab) -> None:
    fds_before = _ns_fds()
    with subprocess.Popen(["ip", "netns", "exec", lab.ns, sys.executable, "-c",
                           "import socket, sys\n"
                           "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                           "s.bind(('127.0.0.1', 5300))\n"
                           "print('ready', flush=True)\n"
                           "sys.stdin.readline()\n"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        # lo must be up for the process to bind 127.0.0.1: then the gate must leave it up.
        sh("ip", "-n", lab.ns, "link", "set", "lo", "up")
        try:
            assert proc.stdout.readline().strip() == "ready"
            with pytest.raises(OSError):
                NetnsGate.open(lab.path, [BuildRule(lab.cgroup, QUEUE)], dns_port=5300,
                               sink_port=5301)
            assert [line for line in lab.leftovers() if ":5300" not in line] == []
            assert lab.lo_up()
        finally:
            proc.stdin.close()
    assert _ns_fds() == fds_before


def _key(payload: bytes) -> bytes:
    """The backstop's key for a queued packet's flow (no NAT here: as it will leave)."""
    flow = parse_flow(payload)
    return flow_key(flow.family, flow.proto_number, ipaddress.ip_address(flow.src).packed,
                    ipaddress.ip_address(flow.dst).packed, flow.src_port, flow.dst_port)


def test_a_member_inside_is_held_by_the_backstop_until_its_gate_judges_it(
        lab: Lab, bpf: BpfOwner, tmp_path: Path) -> None:
    # A "cargo" by file identity: its exec inside the namespace makes it a member at once.
    cargo = tmp_path / "toolchain" / "bin" / "cargo"
    cargo.parent.mkdir(parents=True)
    shutil.copy2(os.path.realpath(sys.executable), cargo)
    bpf.add_cargo_file(str(cargo))
    env = {"PYTHONPATH": os.path.dirname(os.path.dirname(dns.__file__))}
    dropped = bpf.stats()["backstop_dropped"]
    before = lab.send("udp4:before", "tcp4:/before", python=str(cargo),
                      env={**env, "EM_TIMEOUT": "1"})
    # A cgroup_skb drop fails a UDP send with EPERM; a dropped SYN is retried until timeout.
    assert before == {"udp4:before": "PermissionError", "tcp4:/before": "timeout"}
    assert bpf.stats()["backstop_dropped"] > dropped  # held in the kernel, not by rules

    hooks = _Resolver()
    server = DnsServer(hooks, _free_port(socket.SOCK_DGRAM), upstreams=[])
    server.start()

    def judge(packet: QueuedPacket) -> tuple[int, int | None]:
        bpf.allow_flow(_key(packet.payload))  # the verdict, written before the accept
        return NF_ACCEPT, None

    # A connection whose first SYN leaves before the gate exists: the backstop drops it, and
    # nat never sees its retransmissions (conntrack asks nat once per connection), so the
    # gate must judge it in filter when a retransmitted SYN comes.
    early = subprocess.Popen(
        ["sh", "-c", f'echo $$ > {lab.cgroup_dir}/cgroup.procs && exec "$@"', "sh", "ip",
         "netns", "exec", lab.ns, str(cargo), "-c", SENDER, lab.host.v4, lab.host.v6,
         "tcp4:/early"], stdout=subprocess.PIPE, text=True,
        env={**os.environ, **env, "EM_TIMEOUT": "20"})
    try:
        wait_until("the early SYN to be sent", lambda: lab.ns_sh(
            "ss", "-H", "-t", "-n", "state", "syn-sent").strip(), timeout=10)
        assert "/early" not in json.dumps(lab.host.requests())  # held meanwhile
        gate = NetnsGate.open(lab.path, [BuildRule(lab.cgroup, QUEUE)], dns_port=server.port,
                              dns=server)
    except BaseException:
        early.kill()
        early.wait()
        server.stop()
        raise
    try:
        verdicts = Verdicts(gate, judge)
        try:
            early_out, _ = early.communicate(timeout=30)
            after = lab.send("udp4:after", "tcp4:/after", "udp6:after6",
                             "dnsu4:pkg.test.example", python=str(cargo), env=env)
        finally:
            verdicts.stop()
            assert gate.close() == []
    finally:
        server.stop()
    assert after == {"udp4:after": "echo", "tcp4:/after": "ok", "udp6:after6": "echo",
                     "dnsu4:pkg.test.example": [ANSWER]}  # DNS: the gate's loopback listener
    assert json.loads(early_out) == {"tcp4:/early": "ok"}  # judged late, then through
    got = json.dumps(lab.host.requests())
    assert "/after" in got and "before" not in got
    assert {("udp", 5353), ("tcp", 8080)} <= {(p, port) for p, port, _v, _x in verdicts.seen}
    assert lab.leftovers() == []


@pytest.fixture
def bpf() -> Iterator[BpfOwner]:
    owner = BpfOwner.open(MarkLayout(), Cgroups.discover().mount)
    try:
        yield owner
    finally:
        assert owner.close() == []


NS_CHILD = r"""
import ctypes, json, os, socket, struct, sys
print(json.dumps({"pid": os.getpid()}), flush=True)
sys.stdin.readline()
assert ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0  # CLONE_NEWNET
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
cookie = struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, 71, 8))[0]
print(json.dumps({"cookie": cookie}), flush=True)
sys.stdin.readline()
"""


def _say(proc: subprocess.Popen[str], line: str | None = None) -> dict[str, Any]:
    """Optionally send ``line``, then read the child's next JSON line."""
    assert proc.stdin is not None and proc.stdout is not None
    if line is not None:
        proc.stdin.write(line)
        proc.stdin.flush()
    out: dict[str, Any] = json.loads(proc.stdout.readline())
    return out


def test_sock_create_reports_the_namespaces_members_make_sockets_in(bpf: BpfOwner) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", NS_CHILD], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        pids = [_say(p)["pid"] for p in procs]
        bpf.set_member(pids[0], member_value(1, ROLE_CRATE))  # the second stays outside
        cookies = [_say(p, "\n")["cookie"] for p in procs]
        seen = bpf.netns_seen()
        assert seen.get(cookies[0]) == pids[0]  # the member's new namespace, with its tgid
        assert cookies[1] not in seen  # a non-member's socket writes nothing
        fd = open_netns(f"/proc/{pids[0]}/ns/net")
        try:
            assert cookie_of(fd) == cookies[0]  # how the daemon names a namespace it opens
        finally:
            os.close(fd)
        assert bpf.forget_netns(cookies[0]) and cookies[0] not in bpf.netns_seen()
    finally:
        for p in procs:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                p.communicate("\n", timeout=10)
