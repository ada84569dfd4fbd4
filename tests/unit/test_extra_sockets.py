"""The resolver and the sinkhole serve sockets handed to them (a gate's, from another network
namespace) beside their own, and stop serving exactly those when told. Here on this host's
loopback with ephemeral ports: no privileges needed."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import dns.message
import dns.query
import dns.rrset
import pytest

from egress_monitor.dns.server import DnsServer, Plan
from egress_monitor.enforce.sinkhole import Sinkhole


class _Answer:
    def begin(self, wire: bytes, client: tuple[str, int], transport: str) -> Plan:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A",
                                                   "198.51.100.9"))
        return Plan(respond=response.to_wire())

    def complete(self, context: Any, response: bytes | None, upstream: str | None,
                 latency_s: float) -> None:
        raise AssertionError("nothing is forwarded")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _bound(kind: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        s.listen(8)
    s.setblocking(False)
    return s


@pytest.fixture
def server() -> Iterator[DnsServer]:
    srv = DnsServer(_Answer(), _port(), upstreams=[])
    srv.start()
    yield srv
    srv.stop()


def _ask(port: int, tcp: bool = False) -> list[str]:
    query = dns.message.make_query("x.test.example", "A")
    answer = (dns.query.tcp if tcp else dns.query.udp)(query, "127.0.0.1", port=port,
                                                       timeout=2)
    return [r.address for rrset in answer.answer for r in rrset]


def test_dns_server_serves_added_sockets_until_removed(server: DnsServer) -> None:
    udp, tcp = _bound(socket.SOCK_DGRAM), _bound(socket.SOCK_STREAM)
    udp_port, tcp_port = udp.getsockname()[1], tcp.getsockname()[1]
    server.add_socket(udp)
    server.add_socket(tcp)
    assert _ask(udp_port) == ["198.51.100.9"]
    assert _ask(tcp_port, tcp=True) == ["198.51.100.9"]
    server.remove_socket(udp)
    server.remove_socket(tcp)
    assert udp.fileno() == -1 and tcp.fileno() == -1  # closed by the server
    with pytest.raises(ConnectionRefusedError):
        _ask(tcp_port, tcp=True)
    server.remove_socket(udp)  # again: nothing
    assert _ask(server.port) == ["198.51.100.9"]  # its own listeners are untouched


def test_stop_closes_added_sockets_and_a_stopped_server_refuses_more() -> None:
    srv = DnsServer(_Answer(), _port(), upstreams=[])
    srv.start()
    udp = _bound(socket.SOCK_DGRAM)
    srv.add_socket(udp)
    srv.stop()
    assert udp.fileno() == -1
    late = _bound(socket.SOCK_DGRAM)
    with pytest.raises(RuntimeError):
        srv.add_socket(late)
    late.close()


def test_sinkhole_serves_added_sockets_until_removed() -> None:
    seen: list[tuple[tuple[str, int] | None, bytes]] = []
    sink = Sinkhole(_port(), lambda _peer, dst, data: seen.append((dst, data)))
    sink.start()
    try:
        extra = _bound(socket.SOCK_STREAM)
        port = extra.getsockname()[1]
        sink.add_socket(extra)
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with pytest.raises(ConnectionResetError):  # cut off once the head was read
                while c.recv(100):
                    pass
        assert [data for _dst, data in seen] == [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]
        sink.remove_socket(extra)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        sink.stop()
