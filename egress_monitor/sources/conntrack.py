"""Per-flow byte counters from conntrack (ctnetlink GET by exact tuple).

The kernel counts every flow's bytes in each direction once ``nf_conntrack_acct`` is on (the
daemon turns it on): no packet is copied to user space to know how much a build uploaded.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

from egress_monitor.events import FlowKey
from egress_monitor.sources.netlink import (
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSG_HDR,
    attributes,
    error_code,
    messages,
    nla,
    nlmsg,
)

NETLINK_NETFILTER = 12
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
NFNL_SUBSYS_CTNETLINK = 1
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY = 1, 9, 10
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_COUNTERS_BYTES = 2
_IP_ATTRS = {4: (1, 2), 6: (3, 4)}  # CTA_IP_V4_SRC/DST, CTA_IP_V6_SRC/DST


def _nested(attr_type: int, payload: bytes) -> bytes:
    return nla(attr_type | NLA_F_NESTED, payload)


def get_request(flow: FlowKey, seq: int) -> bytes:
    """The ctnetlink GET message for the flow's original-direction tuple."""
    src_attr, dst_attr = _IP_ATTRS[flow.family]
    ip = nla(src_attr, ipaddress.ip_address(flow.src).packed) + \
        nla(dst_attr, ipaddress.ip_address(flow.dst).packed)
    proto = nla(CTA_PROTO_NUM, struct.pack("B", flow.proto_number)) + \
        nla(CTA_PROTO_SRC_PORT, struct.pack("!H", flow.src_port)) + \
        nla(CTA_PROTO_DST_PORT, struct.pack("!H", flow.dst_port))
    tuple_orig = _nested(CTA_TUPLE_ORIG, _nested(CTA_TUPLE_IP, ip) +
                         _nested(CTA_TUPLE_PROTO, proto))
    family = socket.AF_INET6 if flow.family == 6 else socket.AF_INET
    return nlmsg((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, NLM_F_REQUEST, seq,
                 struct.pack("!BBH", family, 0, 0) + tuple_orig)


def parse_counters(datagram: bytes) -> tuple[int, int] | None:
    """(bytes sent, bytes received) from a ctnetlink answer; None when the flow is gone."""
    for msg_type, _flags, body in messages(datagram):
        if msg_type == NLMSG_ERROR:
            code = error_code(body)
            if code in (0, errno.ENOENT):
                return None
            raise OSError(code, f"conntrack: {errno.errorcode.get(code, code)}")
        if msg_type == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW:
            attrs = attributes(body, 4)
            counts = []
            for key in (CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY):
                inner = attributes(attrs.get(key, b""))
                raw = inner.get(CTA_COUNTERS_BYTES, b"")
                counts.append(struct.unpack("!Q", raw)[0] if len(raw) == 8 else 0)
            return counts[0], counts[1]
    return None


STALE_READS = 16  # answers to earlier requests read and dropped before giving up


def answer_seq(datagram: bytes) -> int | None:
    """The sequence number of a netlink datagram's first message, or None if it has none."""
    if len(datagram) < NLMSG_HDR.size:
        return None
    seq: int = NLMSG_HDR.unpack_from(datagram)[3]
    return seq


class Conntrack:
    """A ctnetlink socket for counter look-ups."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.settimeout(0.5)
        self._seq = 0

    def counters(self, flow: FlowKey) -> tuple[int, int] | None:
        """(bytes sent, bytes received) of a flow so far, or None when conntrack forgot it.

        The answer is the one carrying this request's sequence number: a late answer to an
        earlier request (one that timed out) is read and dropped, never taken for this flow's.
        Raises OSError (``TimeoutError`` included) when no answer comes.
        """
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self._sock.send(get_request(flow, self._seq))
        for _ in range(STALE_READS):
            datagram = self._sock.recv(65536)
            if answer_seq(datagram) == self._seq:
                return parse_counters(datagram)
        raise TimeoutError(f"conntrack: no answer to request {self._seq}")

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()
