"""A small nfnetlink_queue client: bind queues, receive held packets, send verdicts.

Written here rather than taken from ``netfilterqueue`` (see docs/architecture.md): it needs no
C build, one socket serves every build's queue number (the queue number *is* the build, so a
packet is tied to its build without any lookup), it asks the kernel for the sending socket's
uid (NFQA_CFG_F_UID_GID), and it never sets NFQA_CFG_F_FAIL_OPEN: with no reader, or a full
queue, the kernel drops build traffic rather than passing it (fail closed).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import time

from egress_monitor.events import QueuedPacket
from egress_monitor.sources.netlink import (
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    MalformedNetlink,
    NetlinkError,
    attributes,
    error_code,
    error_seq,
    messages,
    nla,
    nlmsg,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_GSO = 0x4
NFQA_CFG_F_UID_GID = 0x8
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_PAYLOAD = 10
NFQA_UID = 16
NF_DROP = 0
NF_ACCEPT = 1
NF_REPEAT = 4
_NFGEN = struct.Struct("!BBH")  # family, version, res_id (queue number, network order)
_PACKET_HDR = struct.Struct("!IHB")  # packet_id, hw_protocol, hook


def _msg_type(msg: int) -> int:
    return (NFNL_SUBSYS_QUEUE << 8) | msg


def decode_packets(datagram: bytes, received_ns: int = 0) -> list[QueuedPacket]:
    """The held packets in one datagram from the queue socket; other messages, and packet
    messages without a readable packet header, are skipped. Never raises."""
    out: list[QueuedPacket] = []
    for msg_type, _flags, body in messages(datagram):
        if msg_type != _msg_type(NFQNL_MSG_PACKET) or len(body) < _NFGEN.size:
            continue
        queue = _NFGEN.unpack_from(body)[2]
        attrs = attributes(body, _NFGEN.size)
        hdr = attrs.get(NFQA_PACKET_HDR)
        if hdr is None or len(hdr) < _PACKET_HDR.size:
            continue
        uid_raw = attrs.get(NFQA_UID)
        mark_raw = attrs.get(NFQA_MARK)
        out.append(QueuedPacket(
            queue=queue,
            packet_id=_PACKET_HDR.unpack_from(hdr)[0],
            payload=attrs.get(NFQA_PAYLOAD, b""),
            uid=struct.unpack("!I", uid_raw)[0] if uid_raw and len(uid_raw) == 4 else None,
            received_ns=received_ns,
            mark=struct.unpack("!I", mark_raw)[0] if mark_raw and len(mark_raw) == 4 else None,
        ))
    return out


class QueueSocket:
    """One netlink socket bound to any number of queue numbers."""

    def __init__(self, copy_range: int = 0xFFFF, maxlen: int = 4096,
                 rcvbuf: int = 8 << 20) -> None:
        self._copy_range = copy_range
        self._maxlen = maxlen
        self._seq = 0
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._sock.bind((0, 0))
        self.bound: set[int] = set()
        self._pending: list[bytes] = []

    def fileno(self) -> int:
        """For select/poll."""
        return self._sock.fileno()

    # -- configuration (blocking, acknowledged) --------------------------------------------
    def bind_queue(self, queue: int) -> None:
        """Take packets of ``queue``; raises NetlinkError (EBUSY) if another socket has it."""
        self._config(queue, nla(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)))
        self.bound.add(queue)
        self._config(queue, nla(NFQA_CFG_PARAMS,
                                struct.pack("!IBxxx", self._copy_range, NFQNL_COPY_PACKET)))
        self._config(queue, nla(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", self._maxlen)))
        flags = NFQA_CFG_F_UID_GID | NFQA_CFG_F_GSO
        self._config(queue, nla(NFQA_CFG_FLAGS, struct.pack("!I", flags))
                     + nla(NFQA_CFG_MASK, struct.pack("!I", flags)))

    def unbind_queue(self, queue: int) -> None:
        """Stop taking ``queue``; packets still held in it are dropped by the kernel."""
        self.bound.discard(queue)
        self._config(queue, nla(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, 0)))

    def _config(self, queue: int, attrs: bytes) -> None:
        self._seq += 1
        seq = self._seq
        payload = _NFGEN.pack(socket.AF_UNSPEC, 0, queue) + attrs
        self._sock.setblocking(True)
        try:
            self._sock.send(nlmsg(_msg_type(NFQNL_MSG_CONFIG), NLM_F_REQUEST | NLM_F_ACK,
                                  seq, payload))
            # Packets may already be arriving for other queues: keep them for read().
            while True:
                data = self._sock.recv(1 << 17)
                acked = False
                for msg_type, _flags, body in messages(data):
                    if msg_type == NLMSG_ERROR:
                        if error_seq(body) != seq:
                            continue
                        try:
                            code = error_code(body)
                        except MalformedNetlink:
                            code = errno.EPROTO
                        if code:
                            raise NetlinkError(code, f"nfqueue config of queue {queue}: "
                                               f"{errno.errorcode.get(code, code)}")
                        acked = True
                    else:
                        self._pending.append(data)
                if acked:
                    return
        finally:
            self._sock.setblocking(False)

    # -- packets ---------------------------------------------------------------------------
    def read(self, max_datagrams: int = 256) -> list[QueuedPacket]:
        """Held packets waiting now (non-blocking)."""
        datagrams, self._pending = self._pending, []
        for _ in range(max_datagrams):
            try:
                datagrams.append(self._sock.recv(1 << 17))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # The kernel dropped packets it could not queue to us: build traffic
                    # that is lost is refused traffic (fail closed); carry on reading.
                    continue
                raise
        now = time.monotonic_ns()
        return [p for data in datagrams for p in decode_packets(data, now)]

    def verdict(self, queue: int, packet_id: int, verdict: int,
                mark: int | None = None) -> None:
        """Release (NF_ACCEPT), drop (NF_DROP) or re-inject (NF_REPEAT) one held packet."""
        attrs = nla(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))
        if mark is not None:
            attrs += nla(NFQA_MARK, struct.pack("!I", mark))
        self._seq += 1
        self._sock.send(nlmsg(_msg_type(NFQNL_MSG_VERDICT), NLM_F_REQUEST, self._seq,
                              _NFGEN.pack(socket.AF_UNSPEC, 0, queue) + attrs))

    def close(self) -> None:
        """Unbind every queue and close; held packets are dropped by the kernel."""
        for queue in list(self.bound):
            with contextlib.suppress(OSError):
                self.unbind_queue(queue)
        self._sock.close()
