"""SOCKS4, 4a and 5 requests from the client's bytes, whole or in pieces."""

from __future__ import annotations

import struct

import pytest

from egress_monitor.detect.socks import MORE, SocksRequest, parse_socks

V5_NAME = (b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(b"exfil.example")])
           + b"exfil.example" + struct.pack("!H", 443))
V5_AUTH = (b"\x05\x02\x00\x02" + b"\x01\x04user\x06s3cret" + b"\x05\x01\x00\x01"
           + bytes([198, 51, 100, 9]) + struct.pack("!H", 8080))
V5_V6 = (b"\x05\x01\x00" + b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + struct.pack("!H", 22))
V4 = b"\x04\x01" + struct.pack("!H", 80) + bytes([198, 51, 100, 9]) + b"me\0"
V4A = b"\x04\x01" + struct.pack("!H", 443) + b"\0\0\0\x01" + b"\0" + b"Exfil.Example\0"


@pytest.mark.parametrize(("data", "want"), [
    (V5_NAME, SocksRequest("socks5", 1, "exfil.example", 443, True)),
    (V5_AUTH, SocksRequest("socks5", 1, "198.51.100.9", 8080, False)),
    (V5_V6, SocksRequest("socks5", 1, "::1", 22, False)),
    (V4, SocksRequest("socks4", 1, "198.51.100.9", 80, False)),
    (V4A, SocksRequest("socks4a", 1, "exfil.example", 443, True)),
])
def test_each_version_names_its_destination_and_every_prefix_asks_for_more(
        data: bytes, want: SocksRequest) -> None:
    assert parse_socks(data) == want
    for cut in range(1, len(data)):
        assert parse_socks(data[:cut]) == MORE, cut
    assert b"s3cret" not in repr(parse_socks(data)).encode()


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"\x05\x00", b"\x05\x01\x00\x07",
    b"\x05\x01\x00\x05\x09\x00\x01", b"\x05\x01\x00\x05\x01\x01\x01",
    b"\x05\x01\x00\x05\x01\x00\x03\x03a b\x00\x01", b"\x04\x07\x00\x50abcd\0",
    b"\x04\x01\x00\x50\x01\x02\x03\x04" + b"u" * 300,
    b"\x04\x01\x00\x50\0\0\0\x01\0" + b"h" * 300, b"\x05\x01\x00\x05\x01\x00\x03\x02\xff\xfe\0\1",
])
def test_what_is_not_socks_is_none(data: bytes) -> None:
    assert parse_socks(data) is None


def test_total_on_every_short_input() -> None:
    for first in (4, 5):
        for second in range(256):
            for tail in (b"", b"\x00", b"\x05", b"\x01\x02\x03\x04\x05\x06\x07\x08\x09"):
                parse_socks(bytes([first, second]) + tail)
