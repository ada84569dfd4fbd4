"""The SYN ahead (bpf/fast.py): the key layout both sides build, the programs carry the layout
and use only their maps, and the rules and the daemon's memo of reset flows.

What the programs do is tested on the real kernel (tests/kernel/test_fast.py)."""

from __future__ import annotations

import socket
import struct

import pytest

from egress_monitor.bpf import fast, programs
from egress_monitor.bpf.asm import KTIME_GET_NS
from egress_monitor.bpf.marks import MarkLayout
from egress_monitor.enforce.rules import FLOW_MARK, BuildRule, MarkGate, render
from egress_monitor.packets import same_connection, tcp_seq
from tests.unit.test_bpf_programs import FDS, insns, map_fds


def test_fast_key_is_what_the_connect_hook_builds() -> None:
    key = fast.fast_key(4242, 4, socket.inet_aton("192.0.2.7"), 443)
    assert len(key) == fast.FAST_KEY
    assert struct.unpack_from("=I", key)[0] == 4242 and key[4] == 4 and key[5] == 0
    assert key[6:8] == b"\x01\xbb"  # the port in network order, as user_port holds it
    assert key[8:12] == socket.inet_aton("192.0.2.7") and key[12:] == bytes(12)
    v6 = fast.fast_key(1, 6, socket.inet_pton(socket.AF_INET6, "2001:db8::1"), 80)
    assert v6[8:] == socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    # The storage record holds key bytes 4-23 from ST_FAMILY on: the backstop compares them.
    assert (fast.ST_FAMILY, fast.ST_PORT, fast.ST_ADDR) == (12, 14, 16)
    assert fast.ST_ADDR + 16 == fast.SOCKET_VALUE


@pytest.mark.parametrize("family", [4, 6])
def test_connect_programs_use_only_their_maps_and_carry_the_layout(family: int) -> None:
    layout = MarkLayout(tag=0x1, tag_mask=0x3, tgid_bits=22, tgid_shift=8, fast=0x40000000)
    code = fast.connect_program(41, 42, 43, layout, family)
    assert len(code) // 8 < 130 and map_fds(code) == {41, 42, 43}
    imms = [imm & 0xFFFFFFFF for _op, _r, _o, imm in insns(code)]
    assert 0x40000001 in imms  # tag | fast: the mark of a SYN sent ahead
    assert 0x1 in imms and layout.tgid_mask in imms and family in imms
    assert fast.SETSOCKOPT in imms  # the helper call
    calls = [imm for op, _r, _o, imm in insns(code) if op == 0x85]
    assert KTIME_GET_NS in calls  # the lease is checked against the clock


def test_no_fast_bit_no_connect_program_and_no_check_in_the_backstop() -> None:
    without = MarkLayout(fast=0)
    with pytest.raises(ValueError):
        fast.connect_program(41, 42, 43, without, 4)
    plain = programs.backstop_program(FDS, without)
    ahead = programs.backstop_program(FDS, MarkLayout())
    assert len(ahead) > len(plain)
    assert 0x40000000 in [imm & 0xFFFFFFFF for _op, _r, _o, imm in insns(ahead)]
    assert 0x40000000 not in [imm & 0xFFFFFFFF for _op, _r, _o, imm in insns(plain)]


GATE = MarkGate(0x80000000, 0x80000000, 31512, fast=0x40000000)
RULES = [BuildRule("system.slice/emb-1.scope", 31500)]


def test_the_ahead_rules_come_first_in_nat_and_never_for_dns_or_refusals() -> None:
    lines = render(RULES, 4, 15353, sink_port=15354, mark_gate=GATE).splitlines()
    ahead = "-A EGRESS-MON-NAT -p tcp ! --dport 53 -m mark --mark 0xc0000000/0xc0000000"
    assert lines.index(f"{ahead} -j CONNMARK --or-mark {FLOW_MARK:#x}") + 1 == \
        lines.index(f"{ahead} -j RETURN")
    first_queue = next(i for i, line in enumerate(lines) if "NFQUEUE" in line)
    first_redirect = next(i for i, line in enumerate(lines) if "--dport 53 -j REDIRECT" in line)
    assert lines.index(f"{ahead} -j RETURN") < min(first_queue, first_redirect)
    # The first data of a flow sent ahead is still queued (the connmark it was given).
    assert any(line.startswith("-A EGRESS-MON-DATA -m mark --mark 0x80000000/0x80000000")
               and "NFQUEUE" in line for line in lines)
    for text in (render(RULES, 4, 15353, refuse=True, mark_gate=GATE),
                 render(RULES, 4, 15353, mark_gate=MarkGate(0x80000000, 0x80000000, 31512))):
        assert "0xc0000000" not in text


def _tcp(seq: int, flags: int = 0x10) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                     socket.inet_aton("192.0.2.1"), socket.inet_aton("198.51.100.2"))
    return ip + struct.pack("!HHIIBBHHH", 40000, 8080, seq, 0, 5 << 4, flags, 1024, 0, 0)


@pytest.mark.parametrize("base, seq, same", [
    (1000, 1000, True), (1000, 1000 + 1460 * 3, True), (0xFFFFFF00, 0x100, True),
    (1000, 999, False), (1000, 1000 + (1 << 24), False), (5, 0x80000000, False),
])
def test_same_connection_table(base: int, seq: int, same: bool) -> None:
    assert same_connection(base, seq) is same
    assert tcp_seq(_tcp(seq)) == seq


def test_tcp_seq_of_what_is_not_tcp() -> None:
    assert tcp_seq(b"") is None and tcp_seq(_tcp(7)[:30]) is None
