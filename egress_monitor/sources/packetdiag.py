"""Packet sockets (AF_PACKET) on the host, by inode: sock_diag's packet_diag dump.

A packet socket sends frames below IP, below netfilter and below cgroup BPF: nothing in
the kernel judges them. All the daemon can do is see one exists and whose it is
(``tamper.py``). One dump lists every packet socket of the daemon's network namespace
(``PACKET_DIAG``, one request and a few answers; on this machine a handful of sockets).
Without packet_diag (no ``CONFIG_PACKET_DIAG``) ``/proc/net/packet`` is read instead.

Total: :func:`parse_dump` and :func:`parse_proc_packet` never raise.
"""

from __future__ import annotations

import socket
import struct

from egress_monitor.sources.netlink import (
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    MalformedNetlink,
    error_code,
    framed,
    nlmsg,
)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_DUMP = 0x300
# packet_diag_req: family, protocol, pad, ino, show, cookie[2]
_REQ = struct.Struct("=BBHIIII")
# packet_diag_msg: family, type, num, ino, cookie[2]
_MSG = struct.Struct("=BBHI")
MAX_ANSWERS = 1024  # datagrams read for one dump, bounded


def parse_dump(data: bytes, seq: int | None = None) -> tuple[set[int], bool, int]:
    """``(inodes, done, error)`` of one dump datagram: the sockets it lists, whether it
    ends the dump, and the errno of an NLMSG_ERROR (0 when none). With ``seq``, messages
    of other requests are skipped."""
    inodes: set[int] = set()
    for msg_type, _flags, msg_seq, body in framed(data):
        if seq is not None and msg_seq != seq:
            continue
        if msg_type == NLMSG_DONE:
            return inodes, True, 0
        if msg_type == NLMSG_ERROR:
            try:
                code = error_code(body)
            except MalformedNetlink:
                code = 1
            return inodes, True, code
        if msg_type == SOCK_DIAG_BY_FAMILY and len(body) >= _MSG.size:
            family, _type, _num, inode = _MSG.unpack_from(body)
            if family == socket.AF_PACKET and inode:
                inodes.add(inode)
    return inodes, False, 0


def parse_proc_packet(text: bytes) -> set[int]:
    """Inodes in ``/proc/net/packet`` (last column; the header and odd lines skipped)."""
    found = set()
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 9 and cols[-1].isdigit() and len(cols[-1]) <= 20:
            found.add(int(cols[-1]))
    return found


class PacketSockets:
    """Lists the host's packet sockets each time :meth:`inodes` is called."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self._proc_net_packet = f"{proc_root}/net/packet"
        self._seq = 0
        self._sock: socket.socket | None = socket.socket(socket.AF_NETLINK,
                                                         socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        self._sock.settimeout(0.5)

    def inodes(self) -> set[int] | None:
        """Inodes of every packet socket now; None when neither source can be read."""
        if self._sock is not None:
            found = self._dump()
            if found is not None:
                return found
            self._sock.close()  # no packet_diag in this kernel: stop asking
            self._sock = None
        try:
            with open(self._proc_net_packet, "rb") as f:
                return parse_proc_packet(f.read(16 << 20))
        except OSError:
            return None

    def _dump(self) -> set[int] | None:
        assert self._sock is not None
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        found: set[int] = set()
        try:
            self._sock.send(nlmsg(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, self._seq,
                                  _REQ.pack(socket.AF_PACKET, 0, 0, 0, 0, 0xFFFFFFFF,
                                            0xFFFFFFFF)))
            for _ in range(MAX_ANSWERS):
                inodes, done, error = parse_dump(self._sock.recv(1 << 16), self._seq)
                found |= inodes
                if done:
                    return None if error else found
        except OSError:
            return None
        return None

    def close(self) -> None:
        """Close the netlink socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
