"""Per-flow byte counters from conntrack (ctnetlink GET by exact tuple).

The kernel counts every flow's bytes in each direction once ``nf_conntrack_acct`` is on (the
daemon turns it on): no packet is copied to user space to know how much a build uploaded.

Answers are matched to requests by sequence number: a late answer to an earlier request (one
that timed out) is never read as the counters of the next flow.
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
    MalformedNetlink,
    attributes,
    error_code,
    framed,
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
MAX_STALE = 16  # answers to earlier requests skipped before giving up on this one


class ConntrackError(OSError):
    """Conntrack answered with an error, or with a message that cannot be read."""


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


class _Stale(Exception):
    """The datagram answers another request."""


def parse_counters(datagram: bytes, seq: int | None = None) -> tuple[int, int] | None:
    """(bytes sent, bytes received) from a ctnetlink answer; None when the flow is gone or
    the datagram holds no answer (with ``seq``: no answer to that request). Raises
    ConntrackError, only, for an error answer or an unreadable one."""
    try:
        return _parse(datagram, seq)
    except _Stale:
        return None


def _parse(datagram: bytes, seq: int | None) -> tuple[int, int] | None:
    answered = False
    for msg_type, _flags, msg_seq, body in framed(datagram):
        if seq is not None and msg_seq != seq:
            continue
        answered = True
        if msg_type == NLMSG_ERROR:
            try:
                code = error_code(body)
            except MalformedNetlink as exc:
                raise ConntrackError(errno.EPROTO, f"conntrack: {exc}") from None
            if code in (0, errno.ENOENT):
                return None
            raise ConntrackError(code, f"conntrack: {errno.errorcode.get(code, code)}")
        if msg_type == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW:
            attrs = attributes(body, 4)
            counts = []
            for key in (CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY):
                inner = attributes(attrs.get(key, b""))
                raw = inner.get(CTA_COUNTERS_BYTES, b"")
                counts.append(struct.unpack("!Q", raw)[0] if len(raw) == 8 else 0)
            return counts[0], counts[1]
    if seq is not None and not answered:
        raise _Stale
    return None


class Conntrack:
    """A ctnetlink socket for counter look-ups."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.settimeout(0.5)
        self._seq = 0

    def counters(self, flow: FlowKey) -> tuple[int, int] | None:
        """(bytes sent, bytes received) of a flow so far, or None when conntrack forgot it.
        Raises ConntrackError, or OSError from the socket (a timeout included)."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self._sock.send(get_request(flow, self._seq))
        for _ in range(MAX_STALE):
            try:
                return _parse(self._sock.recv(65536), self._seq)
            except _Stale:
                continue  # a late answer to an earlier request
        raise ConntrackError(errno.EPROTO, "conntrack: no answer to this request")

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()
