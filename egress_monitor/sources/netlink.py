"""Minimal netlink framing shared by the queue, sock_diag and proc connector sources.

Only ``struct`` work: message headers, attributes, and splitting a datagram into messages.
Byte order is the host's for netlink headers; callers pack big-endian payload fields
themselves where the kernel wants network order.

Total: :func:`messages`, :func:`framed` and :func:`attributes` never raise (they stop at the
first truncated item); :func:`error_code` raises :class:`MalformedNetlink` when an
NLMSG_ERROR payload is too short to carry an error number, and :func:`error_seq` returns
None then.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLA_HDR = struct.Struct("=HH")  # len, type
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED and NLA_F_NET_BYTEORDER


class NetlinkError(OSError):
    """The kernel answered a request with an error (errno in ``errno``)."""


class MalformedNetlink(ValueError):
    """A netlink message too short for what its type says it carries."""


def align4(n: int) -> int:
    """Round a length up to netlink's 4-byte alignment."""
    return (n + 3) & ~3


def nlmsg(msg_type: int, flags: int, seq: int, payload: bytes) -> bytes:
    """One netlink message with header."""
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), msg_type, flags, seq, 0) + payload


def nla(attr_type: int, value: bytes) -> bytes:
    """One attribute, padded to alignment."""
    raw = NLA_HDR.pack(NLA_HDR.size + len(value), attr_type) + value
    return raw + b"\0" * (align4(len(raw)) - len(raw))


def framed(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """Split a datagram into ``(type, flags, seq, payload)``; stops at a truncated message."""
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, msg_type, flags, seq, _pid = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size or offset + length > len(data):
            return
        yield msg_type, flags, seq, data[offset + NLMSG_HDR.size:offset + length]
        offset += align4(length)


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """Split a datagram into ``(type, flags, payload)``; stops at a truncated message."""
    for msg_type, flags, _seq, payload in framed(data):
        yield msg_type, flags, payload


def attributes(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """The attributes from ``offset`` on, by type (last one wins)."""
    attrs: dict[int, bytes] = {}
    while offset + NLA_HDR.size <= len(data):
        length, attr_type = NLA_HDR.unpack_from(data, offset)
        if length < NLA_HDR.size or offset + length > len(data):
            break
        attrs[attr_type & NLA_TYPE_MASK] = data[offset + NLA_HDR.size:offset + length]
        offset += align4(length)
    return attrs


_ERRNO = struct.Struct("=i")


def error_code(payload: bytes) -> int:
    """The (positive) errno of an NLMSG_ERROR payload; 0 is an acknowledgement. Raises
    MalformedNetlink when the payload is shorter than an error number (an empty
    NLMSG_ERROR)."""
    if len(payload) < _ERRNO.size:
        raise MalformedNetlink(f"NLMSG_ERROR of {len(payload)} bytes")
    code: int = -_ERRNO.unpack_from(payload)[0]
    return code


def error_seq(payload: bytes) -> int | None:
    """The sequence number of the request an NLMSG_ERROR answers (from the request header
    it quotes), or None when the payload does not quote one."""
    if len(payload) < _ERRNO.size + NLMSG_HDR.size:
        return None
    seq: int = NLMSG_HDR.unpack_from(payload, _ERRNO.size)[3]
    return seq
