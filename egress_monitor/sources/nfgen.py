"""The nftables ruleset generation, and who committed each change (NETLINK_NETFILTER).

iptables here is the nf_tables backend, so every change to any table (ours or anyone's, by
``iptables``, ``ip6tables`` or ``nft``) is one nftables transaction, and every transaction
ends with an ``NFT_MSG_NEWGEN`` notification to the ``NFNLGRP_NFTABLES`` group carrying the
new generation number and the pid and name of the process that committed it. A
subscription is therefore a change detector costing one non-blocking ``recv`` a second when
nothing changed, and it says who changed it. ``NFT_MSG_GETGEN`` (one request) gives the
generation now: the daemon asks it after its own changes.

Total: :func:`parse_generation` and :func:`parse_commits` never raise.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from egress_monitor.sources.netlink import NLM_F_REQUEST, attributes, framed, nlmsg

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFNLGRP_NFTABLES = 7
NFTA_GEN_ID = 1
NFTA_GEN_PROC_PID = 2
NFTA_GEN_PROC_NAME = 3
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian; 0 here)
_BE32 = struct.Struct("!I")
NEWGEN_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN
GETGEN_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN


@dataclass(frozen=True, slots=True)
class Commit:
    """One nftables transaction: the generation it made, and who committed it."""

    generation: int
    pid: int | None
    comm: str | None


def _commit(body: bytes) -> Commit | None:
    attrs = attributes(body, _NFGENMSG.size)
    gen = attrs.get(NFTA_GEN_ID, b"")
    if len(body) < _NFGENMSG.size or len(gen) < 4:
        return None
    raw_pid = attrs.get(NFTA_GEN_PROC_PID, b"")
    pid = _BE32.unpack_from(raw_pid)[0] if len(raw_pid) >= 4 else None
    name = attrs.get(NFTA_GEN_PROC_NAME)
    comm = name.split(b"\0", 1)[0][:16].decode("utf-8", "replace") if name else None
    return Commit(_BE32.unpack_from(gen)[0], pid, comm)


def parse_generation(data: bytes, seq: int | None = None) -> int | None:
    """The generation in an answer to ``NFT_MSG_GETGEN`` (with ``seq``: to that request),
    or None when the datagram holds none."""
    for msg_type, _flags, msg_seq, body in framed(data):
        if msg_type != NEWGEN_TYPE or (seq is not None and msg_seq != seq):
            continue
        commit = _commit(body)
        if commit is not None:
            return commit.generation
    return None


def parse_commits(data: bytes) -> list[Commit]:
    """The ``NFT_MSG_NEWGEN`` notifications in one multicast datagram (the rule, chain and
    table notifications around them are skipped)."""
    out = []
    for msg_type, _flags, _seq, body in framed(data):
        if msg_type == NEWGEN_TYPE:
            commit = _commit(body)
            if commit is not None:
                out.append(commit)
    return out


class NftGeneration:
    """A request socket for the generation and a subscribed socket for commits.

    Raises OSError at construction when the kernel has no nf_tables netlink (then the caller
    reads the rules back every second instead).
    """

    def __init__(self, rcvbuf: int = 1 << 20) -> None:
        self._req = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_NETFILTER)
        try:
            self._req.settimeout(0.5)
            self._sub = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_NETFILTER)
        except OSError:
            self._req.close()
            raise
        try:
            self._sub.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self._sub.bind((0, 0))
            self._sub.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            self._sub.setblocking(False)
            self._seq = 0
            if self.current() is None:
                raise OSError(errno.EOPNOTSUPP, "no answer to NFT_MSG_GETGEN")
        except OSError:
            self.close()
            raise

    def current(self) -> int | None:
        """The generation now (one request), or None when the kernel does not answer."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        try:
            self._req.send(nlmsg(GETGEN_TYPE, NLM_F_REQUEST, self._seq,
                                 _NFGENMSG.pack(socket.AF_UNSPEC, 0, 0)))
            for _ in range(16):  # a late answer to an earlier request is skipped
                gen = parse_generation(self._req.recv(65536), self._seq)
                if gen is not None:
                    return gen
        except OSError:
            return None
        return None

    def commits(self, max_datagrams: int = 4096) -> tuple[list[Commit], bool]:
        """Every commit notified since the last call, and whether some were lost (the
        socket overflowed: something changed, who is unknown)."""
        out: list[Commit] = []
        lost = False
        for _ in range(max_datagrams):
            try:
                data = self._sub.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    lost = True
                    continue
                raise
            out.extend(parse_commits(data))
        else:
            lost = True  # more than we read: treat as a change of unknown origin
        return out, lost

    def close(self) -> None:
        """Close both sockets."""
        for sock in (getattr(self, "_sub", None), self._req):
            if sock is not None:
                sock.close()
