"""Decode the first packet of a flow (an IPv4 or IPv6 datagram) into a :class:`FlowKey`.

Pure and strict: anything truncated or inconsistent raises :class:`MalformedPacket`, which
the daemon counts and still decides on (a packet it cannot read is never waved through
silently). Only headers are read; IPv6 extension headers are walked to find the transport.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from egress_monitor.events import FlowKey, Protocol


class MalformedPacket(ValueError):
    """The bytes are not a well-formed IPv4/IPv6 packet with a readable transport header."""


_PROTOCOLS = {6: Protocol.TCP, 17: Protocol.UDP, 1: Protocol.ICMP, 58: Protocol.ICMPV6}
# Hop-by-hop, routing, destination options: (next header, length in 8-octet units - 1).
_IPV6_EXT = frozenset({0, 43, 60})
_IPV6_FRAGMENT = 44
_ICMP_ECHO = frozenset({(1, 8), (58, 128)})  # (protocol, type) of echo requests


_V6_EMBEDDED = bytes(10)  # the first 80 bits of ::ffff:a.b.c.d and ::a.b.c.d


def v6_text(raw: bytes) -> str:
    """An IPv6 address as ``str(ipaddress.IPv6Address(raw))`` writes it (RFC 5952), at C
    speed: the C library writes the same text except for addresses with IPv4 embedded in
    their last 32 bits, which it writes dotted (those go the slow way)."""
    if raw[:10] == _V6_EMBEDDED:
        return str(ipaddress.IPv6Address(raw))
    return socket.inet_ntop(socket.AF_INET6, raw)


def parse_flow(packet: bytes) -> FlowKey:
    """The flow key of an IP packet as sent by this host."""
    if not packet:
        raise MalformedPacket("empty packet")
    version = packet[0] >> 4
    if version == 4:
        return _parse_v4(packet)
    if version == 6:
        return _parse_v6(packet)
    raise MalformedPacket(f"IP version {version}")


def _parse_v4(packet: bytes) -> FlowKey:
    if len(packet) < 20:
        raise MalformedPacket("IPv4 header truncated")
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or len(packet) < ihl:
        raise MalformedPacket(f"IPv4 header length {ihl}")
    total = struct.unpack_from("!H", packet, 2)[0]
    if total < ihl:
        raise MalformedPacket(f"IPv4 total length {total}")
    frag = struct.unpack_from("!H", packet, 6)[0] & 0x1FFF
    proto = packet[9]
    src = socket.inet_ntop(socket.AF_INET, packet[12:16])
    dst = socket.inet_ntop(socket.AF_INET, packet[16:20])
    # A non-first fragment carries no transport header: key it without ports.
    transport = packet[ihl:] if frag == 0 else b""
    return _with_transport(4, proto, src, dst, transport, frag != 0)


def _parse_v6(packet: bytes) -> FlowKey:
    if len(packet) < 40:
        raise MalformedPacket("IPv6 header truncated")
    nxt = packet[6]
    src, dst = v6_text(packet[8:24]), v6_text(packet[24:40])
    offset = 40
    fragmented = False
    for _ in range(8):  # bounded walk: a chain of extension headers cannot loop us
        if nxt in _IPV6_EXT:
            if len(packet) < offset + 2:
                raise MalformedPacket("IPv6 extension header truncated")
            nxt, length = packet[offset], (packet[offset + 1] + 1) * 8
            offset += length
        elif nxt == _IPV6_FRAGMENT:
            if len(packet) < offset + 8:
                raise MalformedPacket("IPv6 fragment header truncated")
            frag_offset = struct.unpack_from("!H", packet, offset + 2)[0] >> 3
            fragmented = frag_offset != 0
            nxt = packet[offset]
            offset += 8
        else:
            break
    else:
        raise MalformedPacket("too many IPv6 extension headers")
    if offset > len(packet):
        raise MalformedPacket("IPv6 extension headers overrun the packet")
    transport = packet[offset:] if not fragmented else b""
    return _with_transport(6, nxt, src, dst, transport, fragmented)


def _with_transport(family: int, proto: int, src: str, dst: str, transport: bytes,
                    fragment: bool) -> FlowKey:
    protocol = _PROTOCOLS.get(proto, Protocol.OTHER)
    sport = dport = 0
    if not fragment:
        if protocol in (Protocol.TCP, Protocol.UDP):
            if len(transport) < 4:
                raise MalformedPacket(f"{protocol} header truncated")
            sport, dport = struct.unpack_from("!HH", transport)
        elif protocol in (Protocol.ICMP, Protocol.ICMPV6):
            if len(transport) < 8:
                raise MalformedPacket(f"{protocol} header truncated")
            if (proto, transport[0]) in _ICMP_ECHO:
                sport = struct.unpack_from("!H", transport, 4)[0]  # echo identifier
    return FlowKey(family=family, protocol=protocol, proto_number=proto, src=src,
                   src_port=sport, dst=dst, dst_port=dport)


def _tcp_segment(packet: bytes) -> tuple[int, int] | None:
    """Where the TCP header of an IPv4 or IPv6 packet starts and where the packet ends, or
    None when it is not TCP or too short to say."""
    try:
        if packet[0] >> 4 == 4:
            if packet[9] != 6:
                return None
            total = struct.unpack_from("!H", packet, 2)[0]
            tcp, end = (packet[0] & 0x0F) * 4, min(total, len(packet))
        else:
            nxt, tcp = packet[6], 40
            for _ in range(8):
                if nxt in _IPV6_EXT:
                    nxt, tcp = packet[tcp], tcp + (packet[tcp + 1] + 1) * 8
                else:
                    break
            if nxt != 6:
                return None
            end = len(packet)
        return (tcp, end) if len(packet) >= tcp + 14 else None  # up to the flags byte
    except (IndexError, struct.error):
        return None


def tcp_payload(packet: bytes) -> bytes:
    """The TCP payload of an IPv4 or IPv6 packet (b"" when there is none or it is not TCP)."""
    seg = _tcp_segment(packet)
    if seg is None:
        return b""
    tcp, end = seg
    return packet[tcp + (packet[tcp + 12] >> 4) * 4:end]


def tcp_seq(packet: bytes) -> int | None:
    """The sequence number of a TCP segment (None when it is not one)."""
    seg = _tcp_segment(packet)
    return None if seg is None else int.from_bytes(packet[seg[0] + 4:seg[0] + 8], "big")


def same_connection(base: int, seq: int) -> bool:
    """Whether ``seq`` belongs after ``base`` in one connection's sending direction (within
    16 MiB, modulo 2**32): a new connection on the same ports starts at a random sequence
    number, so it is almost never within that window."""
    return (seq - base) % (1 << 32) < 1 << 24


def is_tcp_syn(packet: bytes) -> bool:
    """Whether a packet is a TCP SYN without ACK: a connection's first packet."""
    seg = _tcp_segment(packet)
    return seg is not None and packet[seg[0] + 13] & 0x12 == 0x02
