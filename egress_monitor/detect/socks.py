"""SOCKS4, SOCKS4a and SOCKS5 requests, from the first bytes a client sends (pure).

A SOCKS client names its real destination in its first message (SOCKS4, 4a) or in its second
one, after the server has picked an authentication method (SOCKS5: greeting, optional
username/password sub-negotiation, then the request). :func:`parse_socks` reads the client's
bytes of that exchange, concatenated, and says one of three things: the request (command,
destination host or address, port), ``MORE`` (a well-formed beginning: wait for the next
packet), or None (not SOCKS). It never raises and looks at no more than the 1 KiB a request
can take; user names and passwords are skipped, never copied out.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final, Literal

MORE: Final = "more"
_ATYP_V4, _ATYP_V6 = 1, 4  # and 3, a name
_MAX_ID = 255  # SOCKS4 user id and 4a host name: NUL-terminated, bounded here


@dataclass(frozen=True, slots=True)
class SocksRequest:
    """A client's request: ``host`` is a name (4a, 5 with a domain) or an address."""

    version: Literal["socks4", "socks4a", "socks5"]
    command: int  # 1 connect, 2 bind, 3 UDP associate (SOCKS5)
    host: str
    port: int
    by_name: bool


def _cstring(data: bytes, start: int) -> tuple[bytes, int] | Literal["more"] | None:
    end = data.find(b"\0", start, start + _MAX_ID + 1)
    if end < 0:
        return MORE if len(data) - start <= _MAX_ID else None
    return data[start:end], end + 1


def _hostname(raw: bytes) -> str | None:
    try:
        name = raw.decode("ascii").lower().rstrip(".")
    except UnicodeDecodeError:
        return None
    return name if name and all(c.isalnum() or c in "-._" for c in name) else None


def _socks4(data: bytes) -> SocksRequest | Literal["more"] | None:
    if len(data) < 9:
        return MORE if data[1:2] in (b"", b"\x01", b"\x02") else None
    if data[1] not in (1, 2):
        return None
    port = int.from_bytes(data[2:4], "big")
    ip = data[4:8]
    user = _cstring(data, 8)
    if not isinstance(user, tuple):
        return user
    if ip[:3] == b"\0\0\0" and ip[3] != 0:  # 4a: the name follows the user id
        name = _cstring(data, user[1])
        if not isinstance(name, tuple):
            return name
        host = _hostname(name[0])
        return None if host is None else SocksRequest("socks4a", data[1], host, port, True)
    return SocksRequest("socks4", data[1], str(ipaddress.IPv4Address(ip)), port, False)


def _socks5(data: bytes) -> SocksRequest | Literal["more"] | None:
    if len(data) < 2:
        return MORE
    n = data[1]
    if n == 0:
        return None
    at = 2 + n
    if len(data) < at:
        return MORE
    methods = data[2:at]
    if len(data) == at:
        return MORE
    if data[at] == 1 and 2 in methods:  # username/password sub-negotiation (RFC 1929)
        if len(data) < at + 2:
            return MORE
        plen_at = at + 2 + data[at + 1]
        if len(data) < plen_at + 1:
            return MORE
        at = plen_at + 1 + data[plen_at]
        if len(data) <= at:
            return MORE
    if data[at] != 5:
        return None
    return _socks5_request(data[at:])


def _socks5_request(req: bytes) -> SocksRequest | Literal["more"] | None:
    if req[1:2] not in (b"", b"\x01", b"\x02", b"\x03") or req[2:3] not in (b"", b"\x00") \
            or req[3:4] not in (b"", b"\x01", b"\x03", b"\x04"):
        return None
    if len(req) < 5:
        return MORE
    command, atyp = req[1], req[3]
    if atyp == _ATYP_V4:
        end, host, by_name = 8, str(ipaddress.IPv4Address(req[4:8])) if len(req) >= 8 else "", \
            False
    elif atyp == _ATYP_V6:
        end, host, by_name = 20, str(ipaddress.IPv6Address(req[4:20])) if len(req) >= 20 \
            else "", False
    else:  # _ATYP_NAME
        end = 5 + req[4]
        name = _hostname(req[5:end]) if len(req) >= end else ""
        if name is None:
            return None
        host, by_name = name, True
    if len(req) < end + 2:
        return MORE
    return SocksRequest("socks5", command, host, int.from_bytes(req[end:end + 2], "big"),
                        by_name)


def parse_socks(data: bytes) -> SocksRequest | Literal["more"] | None:
    """The SOCKS request the client's first bytes make, ``MORE``, or None (see the module)."""
    data = data[:1024]
    if not data:
        return MORE
    if data[0] == 4:
        return _socks4(data)
    if data[0] == 5:
        return _socks5(data)
    return None
