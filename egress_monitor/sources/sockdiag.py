"""Find the socket behind a flow's first packet: sock_diag exact lookup, /proc/net fallback.

TCP and UDP sockets are asked of the kernel by their exact 4-tuple (one request, one answer,
no dump). ICMP has no sock_diag lookup: a ping socket is found in /proc/net/icmp{,6} by its
echo identifier, and raw sockets are all candidates (the caller narrows them to the build's
own processes).

Answers are matched to requests by sequence number (a late answer to a request that timed out
is skipped, never taken for the next flow's socket); :func:`parse_inode` never raises.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from egress_monitor.events import FlowKey, Protocol
from egress_monitor.sources.netlink import NLM_F_REQUEST, NLMSG_ERROR, framed, nlmsg
from egress_monitor.sources.procfs import ProcFS

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
_REQ = struct.Struct("=BBBxI")  # family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src, dst (network order)
_TAIL = struct.Struct("=III")  # ifindex, cookie[2]
_NOCOOKIE = 0xFFFFFFFF
# inet_diag_msg: family, state, timer, retrans (4 B), sockid (48 B), expires, rqueue,
# wqueue, uid, inode (u32 each).
_MSG_UID_INODE = struct.Struct("=II")
_MSG_UID_OFFSET = 4 + 48 + 12
MAX_STALE = 16  # answers to earlier requests skipped before giving up on this one
STALE = -1  # parse_inode: the datagram answers another request


def parse_inode(data: bytes, seq: int | None = None) -> int | None:
    """The socket inode in a sock_diag answer: None when the kernel knows no such socket
    (or the answer cannot be read), ``STALE`` when, with ``seq``, the datagram holds no
    answer to that request."""
    for msg_type, _flags, msg_seq, body in framed(data):
        if seq is not None and msg_seq != seq:
            continue
        if msg_type == NLMSG_ERROR or msg_type != SOCK_DIAG_BY_FAMILY:
            return None
        if len(body) >= _MSG_UID_OFFSET + _MSG_UID_INODE.size:
            inode: int = _MSG_UID_INODE.unpack_from(body, _MSG_UID_OFFSET)[1]
            return inode or None
        return None
    return STALE if seq is not None else None


def _addr16(family: int, addr: str) -> bytes:
    packed = ipaddress.ip_address(addr).packed
    return packed + b"\0" * (16 - len(packed))


class SocketFinder:
    """Maps a flow key to candidate socket inodes."""

    def __init__(self, procfs: ProcFS) -> None:
        self._proc = procfs
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        self._sock.settimeout(0.5)
        self._seq = 0

    def inodes(self, flow: FlowKey) -> set[int]:
        """Inodes of the sockets that may have sent this flow (empty when none is found)."""
        if flow.protocol is Protocol.TCP:
            inode = self._exact(flow, socket.IPPROTO_TCP, flow.src, flow.src_port,
                                flow.dst, flow.dst_port)
            return {inode} if inode else set()
        if flow.protocol is Protocol.UDP:
            # The kernel's UDP lookup takes the tuple as a *received* packet would carry it:
            # source = the peer, destination = our socket.
            inode = self._exact(flow, socket.IPPROTO_UDP, flow.dst, flow.dst_port,
                                flow.src, flow.src_port)
            if inode:
                return {inode}
            v6 = "6" if flow.family == 6 else ""
            return self._proc.net_inodes("udp" + v6, flow.src_port)
        if flow.protocol in (Protocol.ICMP, Protocol.ICMPV6):
            v6 = "6" if flow.family == 6 else ""
            found = self._proc.net_inodes("icmp" + v6, flow.src_port)
            return found or self._proc.net_inodes("raw" + v6)
        return self._proc.net_inodes("raw6" if flow.family == 6 else "raw")

    def _exact(self, flow: FlowKey, proto: int, src: str, sport: int, dst: str,
               dport: int) -> int | None:
        family = socket.AF_INET6 if flow.family == 6 else socket.AF_INET
        req = (_REQ.pack(family, proto, 0, 0xFFFFFFFF)
               + _SOCKID.pack(sport, dport, _addr16(family, src), _addr16(family, dst))
               + _TAIL.pack(0, _NOCOOKIE, _NOCOOKIE))
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        try:
            self._sock.send(nlmsg(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, self._seq, req))
            for _ in range(MAX_STALE):
                inode = parse_inode(self._sock.recv(8192), self._seq)
                if inode != STALE:
                    return inode
        except OSError:
            return None
        return None

    def close(self) -> None:
        """Close the netlink socket."""
        self._sock.close()
