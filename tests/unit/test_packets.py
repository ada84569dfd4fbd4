"""The first-packet decoder, fed packets built by scapy and deliberately broken bytes."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)

from egress_monitor.events import FlowKey, Protocol
from egress_monitor.packets import MalformedPacket, parse_flow, v6_text


def test_tcp_syn_over_ipv4() -> None:
    pkt = bytes(IP(src="198.51.100.1", dst="198.51.100.2") / TCP(sport=40000, dport=443,
                                                                  flags="S"))
    assert parse_flow(pkt) == FlowKey(4, Protocol.TCP, 6, "198.51.100.1", 40000,
                                      "198.51.100.2", 443)


def test_udp_over_ipv6_behind_extension_headers() -> None:
    pkt = bytes(IPv6(src="2001:db8::1", dst="2001:db8::53") / IPv6ExtHdrHopByHop()
                / IPv6ExtHdrDestOpt() / UDP(sport=5000, dport=53) / b"query")
    flow = parse_flow(pkt)
    assert (flow.family, flow.protocol, flow.src, flow.dst, flow.src_port, flow.dst_port) == \
        (6, Protocol.UDP, "2001:db8::1", "2001:db8::53", 5000, 53)


def test_icmp_echo_keys_on_identifier() -> None:
    v4 = parse_flow(bytes(IP(src="198.51.100.1", dst="198.51.100.2") / ICMP(id=0x4242)))
    assert (v4.protocol, v4.src_port, v4.dst_port) == (Protocol.ICMP, 0x4242, 0)
    v6 = parse_flow(bytes(IPv6(src="2001:db8::1", dst="2001:db8::2")
                          / ICMPv6EchoRequest(id=7)))
    assert (v6.protocol, v6.src_port) == (Protocol.ICMPV6, 7)


def test_later_fragment_has_no_ports() -> None:
    pkt = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2")
                / IPv6ExtHdrFragment(offset=100, nh=17) / (b"x" * 16))
    flow = parse_flow(pkt)
    assert flow.protocol is Protocol.UDP and flow.src_port == flow.dst_port == 0


def test_other_protocols_are_named_other() -> None:
    flow = parse_flow(bytes(IP(src="198.51.100.1", dst="198.51.100.2", proto=47) / b"gre!"))
    assert flow.protocol is Protocol.OTHER and flow.proto_number == 47


@pytest.mark.parametrize("raw, why", [
    (b"", "empty"),
    (b"\x45" + b"\0" * 10, "IPv4 header truncated"),
    (bytes(IP(src="198.51.100.1", dst="198.51.100.2") / TCP())[:22], "tcp header truncated"),
    (b"\x4f" + b"\0" * 19, "IPv4 header length"),
    (b"\x60" + b"\0" * 20, "IPv6 header truncated"),
    (b"\x20" * 40, "IP version 2"),
])
def test_malformed_packets_raise_a_typed_error(raw: bytes, why: str) -> None:
    with pytest.raises(MalformedPacket, match=why):
        parse_flow(raw)


def test_random_bytes_never_raise_anything_else() -> None:
    rng_bytes = os.urandom(200_000)
    for i in range(0, len(rng_bytes) - 80, 40):
        chunk = bytes([0x45 if i % 3 else 0x60]) + rng_bytes[i:i + (i % 79)]
        with contextlib.suppress(MalformedPacket):
            parse_flow(chunk)


@pytest.mark.parametrize("seed", range(4))
def test_v6_text_writes_what_ipaddress_writes(seed: int) -> None:
    """Policy, DNS answers and events compare addresses as text: the fast writer must agree
    with ``ipaddress`` on every shape (runs of zeros of each length and place, embedded
    IPv4, all zeros, all ones)."""
    rng = random.Random(seed)
    samples = [bytes(16), b"\xff" * 16, bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1]),
               bytes(12) + bytes([192, 0, 2, 1]), bytes(15) + b"\x01",
               ipaddress.IPv6Address("2001:db8::1").packed,
               ipaddress.IPv6Address("2001:db8:0:1:1:1:1:1").packed,
               ipaddress.IPv6Address("fe80::1:0:0:1").packed]
    for _ in range(5000):
        # Words mostly zero, so that runs of zeros of every length and place come up.
        words = [rng.choice((0, 0, 0, 1, 0xFFFF, rng.randrange(1 << 16))) for _ in range(8)]
        samples.append(b"".join(w.to_bytes(2, "big") for w in words))
    for raw in samples:
        assert v6_text(raw) == str(ipaddress.IPv6Address(raw)), raw.hex()
