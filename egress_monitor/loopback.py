"""Who listens where a loopback flow goes (pure): the sockets of ``/proc/net/{tcp,udp}{,6}``.

A build talking to its own test server on loopback is fine; talking to a listener outside the
build (a proxy, a container engine's API, a cache server) is a way out and is judged by the
policy (``loopback: same-build``). The caller reads the tables, finds the sockets the kernel
may deliver the flow to (:func:`reached`), and asks whether every one of them is held by a
process of the flow's build.

Only sockets that accept new peers count: TCP in LISTEN, UDP unconnected. A build cannot make
an outside listener look like its own by binding its *client* socket to the listener's port
(that socket is not listening), nor by listening on the same port at another loopback address:
an exact address match is preferred, as the kernel prefers it, and a wildcard listener counts
only when no exact one exists. When the kernel may balance between several (SO_REUSEPORT),
all of them must be the build's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

TCP_LISTEN = 0x0A
UDP_UNCONNECTED = 0x07


@dataclass(frozen=True, slots=True)
class NetEntry:
    """One socket of a ``/proc/net`` table: its local address and port, state and inode."""

    addr: str
    port: int
    state: int
    inode: int


def _address(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    if len(raw) != 16:
        raise ValueError("not an address")
    v6 = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return str(v6.ipv4_mapped) if v6.ipv4_mapped else str(v6)


def parse_line(line: str) -> NetEntry | None:
    """One line of a table (the header and anything malformed give None)."""
    cols = line.split()
    if len(cols) < 10 or ":" not in cols[1]:
        return None
    hexaddr, _, hexport = cols[1].partition(":")
    try:
        return NetEntry(_address(hexaddr), int(hexport, 16), int(cols[3], 16), int(cols[9]))
    except ValueError:
        return None


def parse_table(text: str) -> list[NetEntry]:
    """Every well-formed line of a table."""
    return [e for e in map(parse_line, text.splitlines()) if e is not None]


def reached(entries: Iterable[NetEntry], protocol: str, dst: str, port: int) -> set[int]:
    """Inodes of the sockets that may receive a new ``protocol`` flow to ``dst:port``."""
    state = TCP_LISTEN if protocol == "tcp" else UDP_UNCONNECTED
    candidates = [e for e in entries if e.port == port and e.state == state]
    exact = {e.inode for e in candidates if e.addr == dst}
    if exact:
        return exact
    wildcards = ("0.0.0.0", "::") if ":" not in dst else ("::",)
    return {e.inode for e in candidates if e.addr in wildcards}
