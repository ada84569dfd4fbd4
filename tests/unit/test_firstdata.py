"""The judgement of first data, table-driven: relays, unfinished relays, TLS names."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from egress_monitor.firstdata import judge, pending
from egress_monitor.policy.engine import Subject
from egress_monitor.policy.loader import parse_policy

HELLO = (Path(__file__).parents[1] / "fixtures" / "client_hello.bin").read_bytes()  # SNI
# registry.test.example
POLICY = parse_policy(
    "version: 1\nmode: enforce\ngroups:\n  zone: {hosts: ['*.test.example']}\n"
    "  net: {cidrs: ['198.51.100.0/24']}\nrules:\n"
    "  - {id: zone, role: build-script, to: [zone], action: allow}\n"
    "  - {id: net, role: build-script, to: [net], action: allow}\n")
DST = {"ip": "198.51.100.2", "port": 1080, "names": []}
SOCKS5 = (b"\x05\x01\x00\x05\x01\x00\x03\x0dexfil.example" + struct.pack("!H", 443))
SOCKS4 = b"\x04\x01\x00\x50" + bytes([198, 51, 100, 9]) + b"\0"


def run(data: bytes, *, enforce: bool = True, spent: bool = False,
        names: tuple[str, ...] = ()) -> tuple[bool, list[tuple[str, str]]]:
    j = judge(data, spent=spent, names=names, dst=DST, subject=Subject(role="build-script"),
              policy=POLICY, enforce=enforce, hit=None)
    return j.refuse, [(kind, ev.get("proxied_to") or ev.get("sni") or ev.get("reason", ""))
                      for kind, _sev, ev in j.alerts]


@pytest.mark.parametrize(("data", "kw", "want"), [
    (b"\r\n\r\nCONNECT exfil.example:443 HTTP/1.1\r\n\r\n", {},
     (True, [("blocked_attempt", "exfil.example:443")])),
    (b"\r\nCONNECT exfil.example:443 HTTP/1.1\r\n\r\n", {"enforce": False},
     (False, [("policy_alert", "exfil.example:443")])),
    (b"CONNECT pkg.test.example:443 HTTP/1.1\r\n\r\n", {}, (False, [])),
    (b"GET http://exfil.example/x HTTP/1.1\r\n\r\n", {},
     (True, [("blocked_attempt", "exfil.example:80")])),
    (SOCKS5, {}, (True, [("blocked_attempt", "exfil.example:443")])),
    (SOCKS4, {}, (False, [])),  # an address the policy allows
    (b"CONNECT exf", {"spent": True}, (True, [("blocked_attempt", "unjudged")])),
    (b"\x05\x01\x00", {"spent": True, "enforce": False}, (False, [("policy_alert", "unjudged")])),
    (b"\x05\x01\x00", {}, (False, [])),  # not spent: the caller waits for more
    (HELLO, {}, (False, [])),
    (HELLO, {"names": ("mirror.test.example",)},
     (True, [("blocked_attempt", "registry.test.example")])),
    (HELLO, {"names": ("mirror.test.example",), "enforce": False},
     (False, [("tls_unlisted_name", "registry.test.example")])),
    (b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", {}, (False, [])),
])
def test_judge(data: bytes, kw: dict[str, object], want: tuple[bool, list[tuple[str, str]]]
               ) -> None:
    assert run(data, **kw) == want  # type: ignore[arg-type]


def test_an_unlisted_sni_in_enforce_mode_is_refused_with_the_sni() -> None:
    policy = parse_policy("version: 1\nmode: enforce\n")
    j = judge(HELLO, spent=False, names=(), dst=DST, subject=Subject(role="build-script"),
              policy=policy, enforce=True, hit=None)
    assert j.refuse
    [(kind, severity, ev)] = j.alerts
    assert (kind, severity, ev["sni"], ev["rule"]) == ("blocked_attempt", "critical",
                                                      "registry.test.example",
                                                      "default:build-script")


def test_pending_covers_every_prefix_of_a_relay_request() -> None:
    connect = b"\r\nCONNECT exfil.example:443 HTTP/1.1\r\n"
    assert all(pending(connect[:n]) for n in range(1, connect.index(b"1.1") + 3))
    assert all(pending(SOCKS5[:n]) for n in range(1, len(SOCKS5)))
    assert not pending(SOCKS5) and not pending(b"\x16\x03\x01\x00\x10") and not pending(b"xyz")
