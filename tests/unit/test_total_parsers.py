"""Each parser's contract on the inputs that broke it before (see docs/architecture.md,
"Total parsers"): the documented error, or the documented value, never anything else."""

from __future__ import annotations

import asyncio
import socket
import struct

import dns.message
import dns.rrset
import pytest
from prometheus_client import CollectorRegistry

from egress_monitor.config import ListenError, parse_listen
from egress_monitor.control import BadRequest, parse_request
from egress_monitor.detect.http import MalformedRequest, first_data_complete
from egress_monitor.detect.http import parse_request as parse_http
from egress_monitor.dns.guard import DnsGuard
from egress_monitor.dns.knowledge import Knowledge
from egress_monitor.dns.message import MalformedMessage, error_response, parse_answer, truncated
from egress_monitor.dns.server import DnsServer
from egress_monitor.dns.tunnel import TunnelDetector
from egress_monitor.enforce.cgroups import build_queue_of, find_cgroup2_mount, parse_build_cgroup
from egress_monitor.policy.semver import Version, VersionError, VersionReq
from egress_monitor.sinks.metrics import Metrics
from egress_monitor.sources.conntrack import ConntrackError, parse_counters
from egress_monitor.sources.netlink import MalformedNetlink, error_code, error_seq, nla, nlmsg
from egress_monitor.sources.procfs import parse_cgroup2, parse_net_table, parse_ppid
from egress_monitor.sources.sockdiag import STALE, parse_inode

SUPERSCRIPT_TWO = "\u00b2"  # isdigit() is True, int() refuses it
ARABIC_THREE = "\u0663"  # int() takes it: our parsers want ASCII digits all the same


@pytest.mark.parametrize("head", [
    b"CONNECT evil.example:\xb2 HTTP/1.1\r\n\r\n",
    b"CONNECT evil.example:99999 HTTP/1.1\r\n\r\n",
    b"CONNECT [::1 HTTP/1.1\r\n\r\n",
    b"CONNECT ::1:443 HTTP/1.1\r\n\r\n",
    b"GET http://[::1/x HTTP/1.1\r\n\r\n",
    b"GET http://evil.example:99999/x HTTP/1.1\r\n\r\n",
    b"GET http:///nohost HTTP/1.1\r\n\r\n",
])
def test_http_proxy_destination_that_cannot_be_read(head: bytes) -> None:
    with pytest.raises(MalformedRequest):
        parse_http(head)
    assert first_data_complete(head)  # judged as it is: refused


def test_http_lengths_are_ascii_numbers() -> None:
    for length in (b"\xb2", b"9" * 5000, "\u0663".encode("latin-1", "replace")):
        request = parse_http(b"POST / HTTP/1.1\r\nContent-Length: " + length + b"\r\n\r\n")
        assert request is not None and request.content_length is None
    connect = parse_http(b"CONNECT [2001:db8::7]:8443 HTTP/1.1\r\n\r\n")
    assert connect is not None and (connect.proxy_host, connect.proxy_port) == \
        ("2001:db8::7", 8443)


def _query() -> dns.message.Message:
    return dns.message.make_query("index.crates.io", "A")


def test_dns_response_sent_as_a_query_gets_no_answer() -> None:
    response = dns.message.make_response(_query()).to_wire()
    assert error_response(response, 1) is None
    assert error_response(response, 3, blocked=True) is None


def test_dns_answer_of_another_class_is_ignored() -> None:
    response = dns.message.make_response(_query())
    response.answer.append(dns.rrset.from_text("index.crates.io.", 60, "CH", "A",
                                               "\\# 3 000007"))
    response.answer.append(dns.rrset.from_text("index.crates.io.", 60, "IN", "A", "192.0.2.7"))
    assert parse_answer(response.to_wire(), "index.crates.io").addresses == ("192.0.2.7",)


def test_dns_truncation_of_an_unreadable_question_keeps_the_header() -> None:
    bogus = struct.pack("!HHHHHH", 7, 0x8180, 3, 0, 0, 0) + b"\x05index"
    assert truncated(bogus) == struct.pack("!HHHHHH", 7, 0x8380, 0, 0, 0, 0)
    with pytest.raises(MalformedMessage):
        parse_answer(b"\x00", "x")


def test_empty_nlmsg_error() -> None:
    empty = nlmsg(2, 0, 1, b"")
    with pytest.raises(MalformedNetlink):
        error_code(b"")
    assert error_seq(b"\0\0\0\0") is None
    with pytest.raises(ConntrackError):
        parse_counters(empty)


def _ct_answer(seq: int, sent: int) -> bytes:
    counters = nla(9 | 0x8000, nla(2, struct.pack("!Q", sent))) + \
        nla(10 | 0x8000, nla(2, struct.pack("!Q", 5)))
    return nlmsg(1 << 8, 0, seq, b"\x02\x00\x00\x00" + counters)


def test_conntrack_and_sock_diag_answers_are_matched_by_sequence() -> None:
    late_then_ours = _ct_answer(6, 999) + _ct_answer(7, 120)
    assert parse_counters(late_then_ours, 7) == (120, 5)
    assert parse_counters(_ct_answer(6, 999), 7) is None  # not ours: never its counters
    diag = nlmsg(20, 0, 3, b"\0" * 64 + struct.pack("=II", 0, 4242))
    assert parse_inode(diag, 3) == 4242
    assert parse_inode(diag, 4) == STALE


def test_procfs_text_a_build_shapes() -> None:
    assert parse_ppid(b"42 (a) b (c) S 17 42 42 0") == 17
    assert parse_ppid(b"42 (x) S \xb2 1") is None
    assert parse_cgroup2(b"0::/runner/egress-\xff/x\n") == "/runner/egress-\udcff/x"
    table = b"hdr\n 0: 0100007F:0035 00000000:0000 07 0:0 0:0 0 0 0 555 2\n" \
        b" 1: 0100007F:zz 00000000:0000 07 0:0 0:0 0 0 0 556 2\n"
    assert parse_net_table(table, 53) == {555}


def test_control_requests() -> None:
    assert parse_request(b'{"op": "exec"}\nrest') == {"op": "exec"}
    for bad in (b"[" * 100_000, b'{"op": "x", "n": ' + b"1" * 5000 + b"}", b"\xff",
                b'{"op": 1}', b""):
        with pytest.raises(BadRequest):
            parse_request(bad)


def test_cgroup_names_and_mountinfo() -> None:
    assert parse_build_cgroup("/a/egress-build-q31000-18c1f2a3b4c-42") == (31000,
                                                                            "18c1f2a3b4c-42")
    for name in (f"egress-build-q{ARABIC_THREE}-ab-1", "egress-build-q" + "9" * 5000 + "-a-1",
                 "egress-build-q1-ab-1\n"):
        assert parse_build_cgroup(name) is None
    assert build_queue_of("/x/egress-build-q7-ab-1/sub") == 7
    assert find_cgroup2_mount("1 2 3 - cgroup2 x\n") is None


def test_listen_and_versions() -> None:
    for bad in (f"127.0.0.1:{SUPERSCRIPT_TWO}", f":{ARABIC_THREE}", "a:" + "9" * 5000):
        with pytest.raises(ListenError):
            parse_listen(bad)
    for text in ("=" + "1" * 5000 + ".0.0", f"^{ARABIC_THREE}.2", "1.2.3-" + "9" * 30,
                 ">=" * 2000):
        with pytest.raises(VersionError):
            VersionReq(text)
    with pytest.raises(VersionError):
        Version.parse("1.2.3-" + "9" * 30)


def test_a_malformed_query_is_never_forwarded_upstream() -> None:
    """Bytes that are not a query get a FORMERR or nothing; none reach the upstream (a UDP
    socket here that would record them)."""
    def refuse_all(*_a: object) -> None:
        raise AssertionError("a malformed query must not be attributed or judged")

    guard = DnsGuard(owner=refuse_all,  # type: ignore[arg-type]
                     knowledge=Knowledge(10, 3600, 10), detector=TunnelDetector(),
                     metrics=Metrics(CollectorRegistry()), emit=refuse_all,
                     decide_name=refuse_all,  # type: ignore[arg-type]
                     mode=lambda: "enforce", clock_ns=lambda: 0, wall=lambda: 0.0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
        upstream.bind(("127.0.0.1", 0))
        upstream.setblocking(False)
        server = DnsServer(guard, 0, [upstream.getsockname()], timeout_s=0.2)
        response = dns.message.make_response(_query()).to_wire()
        for wire in (b"\x01\x02\x03", response, b"\xff" * 40):
            answer = asyncio.run(server.answer(wire, ("127.0.0.1", 5353), "udp"))
            assert answer is None or (answer[2] & 0x80 and answer[3] & 0xF == 1), answer
        with pytest.raises(BlockingIOError):
            upstream.recv(100)
