"""The kernel-facing parts of the tamper checks, on bytes: proc connector uid and ptrace
events, nftables generation messages, packet_diag dumps and /proc/net/packet; and the
firewall telling the rule guard what it wrote."""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Sequence

import pytest

from egress_monitor.enforce.firewall import Firewall, FirewallError
from egress_monitor.enforce.rules import BuildRule
from egress_monitor.events import ProcExec, ProcPtrace, ProcUid
from egress_monitor.sources import netlink, nfgen, packetdiag, proc_connector
from tests.unit.test_decoders import proc_event


def test_uid_and_ptrace_events() -> None:
    data = (proc_event(0x4, 20, 7, 7, 65534, 0)      # exec of a setuid-root binary
            + proc_event(0x4, 21, 9, 7, 0, 0)        # a thread of 7: reported for 7
            + proc_event(0x100, 22, 8, 8, 7, 7)      # 7 attached to 8
            + proc_event(0x100, 23, 8, 8, 0, 0)      # the detach: not reported
            + proc_event(0x2, 24, 7, 7))
    assert list(proc_connector.decode(data)) == [
        ProcUid(7, 65534, 0, 20), ProcUid(7, 0, 0, 21), ProcPtrace(7, 8, 22),
        ProcExec(7, 24)]
    short = proc_event(0x4, 1, 7, 7, 0)  # one id missing
    assert list(proc_connector.decode(short)) == []


def gen_msg(msg_type: int, gen: int | None, pid: int | None = None, name: bytes = b"",
            seq: int = 0) -> bytes:
    attrs = b""
    if gen is not None:
        attrs += netlink.nla(nfgen.NFTA_GEN_ID, struct.pack("!I", gen))
    if pid is not None:
        attrs += netlink.nla(nfgen.NFTA_GEN_PROC_PID, struct.pack("!I", pid))
    if name:
        attrs += netlink.nla(nfgen.NFTA_GEN_PROC_NAME, name + b"\0")
    return netlink.nlmsg(msg_type, 0, seq, struct.pack("=BBH", 0, 0, 0) + attrs)


def test_generation_and_commits() -> None:
    newgen = nfgen.NEWGEN_TYPE
    rule = (nfgen.NFNL_SUBSYS_NFTABLES << 8) | 6  # NFT_MSG_NEWRULE: skipped
    data = gen_msg(rule, None) + gen_msg(newgen, 41, 300, b"iptables") + gen_msg(newgen, 42)
    assert nfgen.parse_commits(data) == [nfgen.Commit(41, 300, "iptables"),
                                         nfgen.Commit(42, None, None)]
    assert nfgen.parse_generation(gen_msg(newgen, 7, seq=3), 3) == 7
    assert nfgen.parse_generation(gen_msg(newgen, 7, seq=2), 3) is None  # a late answer
    assert nfgen.parse_generation(gen_msg(newgen, None)) is None
    for cut in range(len(data)):
        nfgen.parse_commits(data[:cut])
        nfgen.parse_generation(data[:cut])


def diag_msg(inode: int, family: int = socket.AF_PACKET, seq: int = 5) -> bytes:
    body = struct.pack("=BBHIII", family, 3, 3, inode, 0, 0) + netlink.nla(5, b"\0" * 4)
    return netlink.nlmsg(packetdiag.SOCK_DIAG_BY_FAMILY, 2, seq, body)


def test_packet_diag_dump() -> None:
    done = netlink.nlmsg(netlink.NLMSG_DONE, 2, 5, b"\0" * 4)
    assert packetdiag.parse_dump(diag_msg(9049) + diag_msg(12), 5) == ({9049, 12}, False, 0)
    assert packetdiag.parse_dump(diag_msg(1, seq=4) + done, 5) == (set(), True, 0)
    assert packetdiag.parse_dump(diag_msg(3, family=2) + done) == (set(), True, 0)
    err = netlink.nlmsg(netlink.NLMSG_ERROR, 0, 5, struct.pack("=i", -2))
    assert packetdiag.parse_dump(err, 5) == (set(), True, 2)
    empty_err = netlink.nlmsg(netlink.NLMSG_ERROR, 0, 5, b"")
    assert packetdiag.parse_dump(empty_err, 5)[1:] == (True, 1)
    data = diag_msg(9049) + done
    for cut in range(len(data)):
        packetdiag.parse_dump(data[:cut])


def test_proc_net_packet() -> None:
    text = (b"sk               RefCnt Type Proto  Iface R Rmem   User   Inode\n"
            b"ffff8f0c4a1b2000 3      3    0003   2     1 0      0      9049\n"
            b"garbage\n"
            b"ffff8f0c4a1b3000 3      3    0003   2     1 0      0      x\n")
    assert packetdiag.parse_proc_packet(text) == {9049}
    assert packetdiag.parse_proc_packet(b"") == set()


class Recorder:
    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail

    def __call__(self, argv: Sequence[str], stdin: str | None
                 ) -> subprocess.CompletedProcess[str]:
        code = 1 if self.fail and self.fail in " ".join(argv) else 0
        return subprocess.CompletedProcess(list(argv), code, "", "boom" if code else "")


def test_the_firewall_says_what_it_wrote() -> None:
    told: list[dict[int, str] | None] = []
    fw = Firewall(runner=Recorder(), resolver_port=15353)
    fw.on_change = told.append
    rules = [BuildRule("/b", 31000)]
    fw.sync(rules)
    fw.install(rules)
    assert told == [{4: fw.rendered(rules, 4), 6: fw.rendered(rules, 6)}] * 2
    failing = Firewall(runner=Recorder(fail="ip6tables-restore"))
    failing.on_change = told.append
    with pytest.raises(FirewallError):
        failing.sync(rules)
    assert told[-1] is None  # part-way: the guard holds the rules to nothing
    assert fw.chains() == {"EGRESS-MON", "EGRESS-MON-DATA", "EGRESS-MON-NAT"}
    assert fw.jump_targets() == {"filter": {"EGRESS-MON", "EGRESS-MON-DATA"},
                                 "nat": {"EGRESS-MON-NAT"}}
