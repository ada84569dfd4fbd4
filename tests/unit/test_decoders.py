"""Netlink decoders fed bytes: a proc-connector datagram captured on the CI machine, and
queue datagrams assembled field by field."""

from __future__ import annotations

import socket
import struct

import pytest

from egress_monitor.events import ProcExec, ProcExit, ProcFork
from egress_monitor.sources import netlink, proc_connector
from egress_monitor.sources.nfqueue import (
    NFNL_SUBSYS_QUEUE,
    NFQA_MARK,
    NFQA_PACKET_HDR,
    NFQA_PAYLOAD,
    NFQA_UID,
    NFQNL_MSG_PACKET,
    decode_packets,
)

# One fork event as the kernel sent it (captured with the probe in docs/architecture.md):
# parent 2367/2367 forked child 2368/2368.
CAPTURED_FORK = bytes.fromhex(
    "4c000000030000000100000000000000010000000100000001000000000000002800000001000000"
    "010000009d996403250000003f0900003f09000040090000400900000000000000000000")


def proc_event(what: int, ts: int, *fields: int) -> bytes:
    body = struct.pack("=IIQ", what, 0, ts) + struct.pack(f"={len(fields)}I", *fields)
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(body), 0) + body
    return netlink.nlmsg(netlink.NLMSG_DONE, 0, 0, cn)


def test_captured_fork_datagram() -> None:
    [event] = list(proc_connector.decode(CAPTURED_FORK))
    assert isinstance(event, ProcFork)
    assert (event.parent, event.child) == (0x93F, 0x940)
    assert event.ts_ns == 0x250364999D


def test_exec_exit_and_thread_events() -> None:
    data = (proc_event(2, 10, 7, 7)            # exec of a process
            + proc_event(2, 11, 8, 7)          # exec reported for a thread: skipped
            + proc_event(1, 12, 7, 7, 9, 7)    # a new thread of 7: skipped
            + proc_event(0x80000000, 13, 7, 7, 0, 17, 1, 1)
            + proc_event(0x200, 14, 7, 7, 0, 0))  # comm change: not ours
    assert list(proc_connector.decode(data)) == [ProcExec(7, 10), ProcExit(7, 13)]


def test_truncated_proc_datagrams_are_ignored() -> None:
    data = proc_event(1, 12, 1, 1, 2, 2)
    for cut in range(len(data)):
        assert list(proc_connector.decode(data[:cut])) == []


def queue_packet(queue: int, packet_id: int, payload: bytes, uid: int | None,
                 mark: int | None = None) -> bytes:
    attrs = netlink.nla(NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 3))
    if mark is not None:
        attrs += netlink.nla(NFQA_MARK, struct.pack("!I", mark))
    if uid is not None:
        attrs += netlink.nla(NFQA_UID, struct.pack("!I", uid))
    attrs += netlink.nla(NFQA_PAYLOAD, payload)
    body = struct.pack("!BBH", socket.AF_INET, 0, queue) + attrs
    return netlink.nlmsg((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET, 0, 0, body)


def test_queue_datagram_with_two_packets() -> None:
    data = queue_packet(31000, 5, b"\x45abc", 1000) + queue_packet(31001, 6, b"\x60", None)
    first, second = decode_packets(data, received_ns=99)
    assert (first.queue, first.packet_id, first.payload, first.uid, first.received_ns) == \
        (31000, 5, b"\x45abc", 1000, 99)
    assert (second.queue, second.packet_id, second.uid) == (31001, 6, None)
    assert first.mark is None


def test_queue_packet_mark_names_a_stamped_creator() -> None:
    from egress_monitor.bpf.marks import MarkLayout
    layout = MarkLayout()
    (pkt,) = decode_packets(queue_packet(31000, 7, b"\x45", 0, mark=layout.stamp(4242)))
    assert pkt.mark is not None and layout.creator(pkt.mark) == 4242
    (short,) = decode_packets(queue_packet(31000, 8, b"\x45", 0, mark=None))
    assert short.mark is None


def test_queue_messages_without_a_packet_header_are_skipped() -> None:
    body = struct.pack("!BBH", socket.AF_INET, 0, 1) + netlink.nla(NFQA_PAYLOAD, b"x")
    data = netlink.nlmsg((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET, 0, 0, body)
    assert decode_packets(data + netlink.nlmsg(netlink.NLMSG_ERROR, 0, 0, b"\0" * 20)) == []
    assert decode_packets(queue_packet(1, 1, b"x", 0)[:-3]) == []


def test_conntrack_get_request_and_counters_answer() -> None:
    from egress_monitor.events import FlowKey, Protocol
    from egress_monitor.sources import conntrack as ct

    flow = FlowKey(6, Protocol.TCP, 6, "2001:db8::1", 40000, "2001:db8::2", 443)
    req = ct.get_request(flow, 7)
    [(msg_type, _flags, body)] = list(netlink.messages(req))
    assert msg_type == (ct.NFNL_SUBSYS_CTNETLINK << 8) | ct.IPCTNL_MSG_CT_GET
    assert body[0] == socket.AF_INET6
    orig = netlink.attributes(netlink.attributes(body, 4)[ct.CTA_TUPLE_ORIG])
    ip = netlink.attributes(orig[ct.CTA_TUPLE_IP])
    assert ip[3] == bytes.fromhex("20010db8000000000000000000000001")
    proto = netlink.attributes(orig[ct.CTA_TUPLE_PROTO])
    assert proto[ct.CTA_PROTO_NUM] == b"\x06" and proto[ct.CTA_PROTO_DST_PORT] == b"\x01\xbb"

    def counters(n: int) -> bytes:
        return netlink.nla(ct.CTA_COUNTERS_BYTES, struct.pack("!Q", n))
    nested = ct.NLA_F_NESTED
    answer = netlink.nlmsg((ct.NFNL_SUBSYS_CTNETLINK << 8) | ct.IPCTNL_MSG_CT_NEW, 0, 7,
                           struct.pack("!BBH", socket.AF_INET6, 0, 0)
                           + netlink.nla(ct.CTA_COUNTERS_ORIG | nested, counters(5_000_000))
                           + netlink.nla(ct.CTA_COUNTERS_REPLY | nested, counters(1_200)))
    assert ct.parse_counters(answer) == (5_000_000, 1_200)
    gone = netlink.nlmsg(netlink.NLMSG_ERROR, 0, 7, struct.pack("=i", -2) + b"\0" * 16)
    assert ct.parse_counters(gone) is None


def test_conntrack_counters_skip_a_late_answer_to_an_earlier_request() -> None:
    from egress_monitor.events import FlowKey, Protocol
    from egress_monitor.sources import conntrack as ct

    def answer(seq: int, sent: int) -> bytes:
        inner = netlink.nla(ct.CTA_COUNTERS_BYTES, struct.pack("!Q", sent))
        return netlink.nlmsg((ct.NFNL_SUBSYS_CTNETLINK << 8) | ct.IPCTNL_MSG_CT_NEW, 0, seq,
                             struct.pack("!BBH", socket.AF_INET, 0, 0)
                             + netlink.nla(ct.CTA_COUNTERS_ORIG | ct.NLA_F_NESTED, inner))

    class FakeSocket:
        def __init__(self, queued: list[bytes]) -> None:
            self.queued = queued
            self.sent: list[bytes] = []

        def send(self, data: bytes) -> None:
            self.sent.append(data)

        def recv(self, _n: int) -> bytes:
            if not self.queued:
                raise TimeoutError("timed out")
            return self.queued.pop(0)

    flow = FlowKey(4, Protocol.UDP, 17, "198.51.100.1", 4000, "198.51.100.2", 53)
    track = ct.Conntrack.__new__(ct.Conntrack)
    # The answer to request 1 came late, after request 2 was sent: it is not flow 2's.
    fake = FakeSocket([answer(1, 999_999_999), answer(2, 42)])
    track._sock, track._seq = fake, 1  # type: ignore[assignment]
    assert track.counters(flow) == (42, 0)
    with pytest.raises(OSError):
        track.counters(flow)  # nothing answers request 3
