"""The DNS guard's pure parts: messages, knowledge with expiry, tunnel detection."""

from __future__ import annotations

import base64
import os
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from egress_monitor.dns.knowledge import NS, Knowledge
from egress_monitor.dns.message import (
    FLAG_TC,
    MalformedMessage,
    error_response,
    parse_answer,
    parse_query,
    truncated,
    with_id,
)
from egress_monitor.dns.tunnel import TunnelDetector, data_like, entropy, parent_domain, redact


def query(name: str, rdtype: str = "A", edns: int | None = None) -> bytes:
    q = dns.message.make_query(name, rdtype, use_edns=edns is not None,
                               payload=edns or 512)
    wire: bytes = q.to_wire()
    return wire


def answer_for(wire: bytes, *records: str) -> bytes:
    q = dns.message.from_wire(wire)
    r = dns.message.make_response(q)
    for text in records:
        name, ttl, rdtype, value = text.split()
        r.answer.append(dns.rrset.from_text(name, int(ttl), "IN", rdtype, value))
    out: bytes = r.to_wire()
    return out


def test_parse_query() -> None:
    q = parse_query(query("Index.Crates.IO.", "AAAA", edns=1232))
    assert (q.name, q.qtype, q.has_edns, q.udp_payload) == ("index.crates.io", "AAAA", True,
                                                            1232)
    plain = parse_query(query("a.example", "TXT"))
    assert (plain.has_edns, plain.udp_payload) == (False, 512)


@pytest.mark.parametrize("wire, why", [
    (b"", "unparseable"),
    (os.urandom(7), "unparseable"),
    (answer_for(query("a.example")), "a response"),
    (struct.pack("!HHHHHH", 1, 0, 0, 0, 0, 0), "0 questions"),
    (struct.pack("!HHHHHH", 1, 0x2800, 0, 0, 0, 0), "opcode UPDATE"),
])
def test_malformed_queries(wire: bytes, why: str) -> None:
    with pytest.raises(MalformedMessage, match=why):
        parse_query(wire)


def test_formerr_for_garbage_keeps_the_id_and_short_garbage_gets_nothing() -> None:
    garbage = struct.pack("!HH", 0xBEEF, 0x0100) + os.urandom(20)
    response = error_response(garbage, 1)
    assert response is not None
    msg_id, flags = struct.unpack_from("!HH", response)
    assert msg_id == 0xBEEF and flags & 0x8000 and flags & 0xF == 1
    assert error_response(b"\x01\x02", 1) is None


def test_nxdomain_with_extended_error_when_client_speaks_edns() -> None:
    blocked = dns.message.from_wire(error_response(query("evil.example", edns=1232), 3,
                                                   blocked=True) or b"")
    assert blocked.rcode() == dns.rcode.NXDOMAIN
    [ede] = blocked.options
    assert isinstance(ede, dns.edns.EDEOption) and ede.code == 15
    plain = dns.message.from_wire(error_response(query("evil.example"), 3, blocked=True) or b"")
    assert plain.rcode() == dns.rcode.NXDOMAIN and plain.edns < 0


def test_answer_follows_the_cname_chain() -> None:
    wire = answer_for(query("alias.test.example"),
                      "alias.test.example. 300 CNAME mid.test.example.",
                      "mid.test.example. 60 CNAME pkg.test.example.",
                      "pkg.test.example. 120 A 198.51.100.2",
                      "pkg.test.example. 120 A 198.51.100.2",
                      "other.example. 5 A 198.51.100.99")
    a = parse_answer(wire, "alias.test.example")
    assert a.names == ("alias.test.example", "mid.test.example", "pkg.test.example")
    assert a.addresses == ("198.51.100.2",) and a.ttl == 60 and a.rcode == "NOERROR"


def test_answer_with_a_cname_loop_ends() -> None:
    wire = answer_for(query("a.example"), "a.example. 5 CNAME b.example.",
                      "b.example. 5 CNAME a.example.")
    assert parse_answer(wire, "a.example").names == ("a.example", "b.example")


def test_truncation_and_ids() -> None:
    wire = answer_for(query("big.example", "TXT"), *[f"big.example. 5 TXT x{i}" for i in
                                                     range(40)])
    cut = truncated(wire)
    assert struct.unpack_from("!H", cut, 2)[0] & FLAG_TC
    assert dns.message.from_wire(cut).answer == []
    assert dns.message.from_wire(cut).question[0].name.to_text() == "big.example."
    assert struct.unpack_from("!H", with_id(wire, 4242))[0] == 4242


def test_knowledge_expires_after_ttl_plus_overlap() -> None:
    k = Knowledge(min_ttl_s=2, max_ttl_s=100, overlap_s=3)
    k.learn("b1", ["198.51.100.2"], ["alias.test.example", "pkg.test.example"], 1, now_ns=0)
    k.learn("b2", ["2001:db8:0:0::2"], ["pkg6.test.example"], 1000, now_ns=0)
    assert k.names("b1", "198.51.100.2", 4 * NS) == ("alias.test.example", "pkg.test.example")
    assert k.names("b2", "2001:db8::2", 4 * NS) == ("pkg6.test.example",)  # normalised
    assert k.names("b2", "198.51.100.2", 4 * NS) == ()  # per build
    assert len(k) == 3
    assert k.expire(4 * NS) == 0
    assert k.expire(5 * NS) == 2  # clamped TTL 2 s + overlap 3 s
    assert k.names("b1", "198.51.100.2", 5 * NS) == ()
    assert k.expire(102 * NS) == 0 and len(k) == 1  # TTL 1000 clamped to 100, + 3 s
    assert k.expire(104 * NS) == 1 and len(k) == 0


def test_knowledge_refresh_extends_and_forget_build() -> None:
    k = Knowledge(min_ttl_s=0, max_ttl_s=100, overlap_s=0)
    k.learn("b1", ["198.51.100.2"], ["a.example"], 10, now_ns=0)
    k.learn("b1", ["198.51.100.2"], ["a.example"], 10, now_ns=5 * NS)
    assert k.expire(11 * NS) == 0 and k.names("b1", "198.51.100.2", 11 * NS) == ("a.example",)
    k.forget_build("b1")
    assert len(k) == 0 and k.expire(100 * NS) == 0


def test_shapes() -> None:
    assert parent_domain("a.b.attacker.example") == "attacker.example"
    assert parent_domain("x.y.bbc.co.uk") == "bbc.co.uk"
    assert entropy("aaaa") == 0 and entropy("abcd") == 2
    secret = base64.b32encode(b"AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG").decode()
    name = f"{secret[:60].lower()}.t.attacker.example"
    assert data_like(name)
    assert "wjalrxut" not in redact(name) and redact(name).endswith(".t.attacker.example")
    for normal in ("index.crates.io", "static.crates.io", "github.com",
                   "objects.githubusercontent.com", "d3h4m5x9n8b7c6.cloudfront.net",
                   "api-abcdef12.region.amazonaws.com"):
        assert not data_like(normal), normal


def test_tunnel_detector() -> None:
    d = TunnelDetector()
    ts = 0
    for name in ("index.crates.io", "static.crates.io", "crates.io", "github.com"):
        for qtype in ("A", "AAAA"):
            ts += NS // 10
            assert d.observe("b1", name, qtype, ts) is None
    found = []
    for i in range(45):
        chunk = os.urandom(10).hex()
        ts += NS // 100
        found.append(d.observe("b1", f"{chunk}{i}.x.attacker.example", "A", ts))
    hits = [f for f in found if f is not None]
    assert len(hits) == 1  # once per window
    assert hits[0].parent == "attacker.example" and "many_unique" in hits[0].reasons
    assert hits[0].count == 41 and hits[0].unique_names == 41
    # A new window reports again; TXT-heavy patterns are their own reason.
    ts += 61 * NS
    txt = [d.observe("b1", f"c{i}.data.example", "TXT", ts + i) for i in range(10)]
    assert txt[-1] is not None and txt[-1].reasons == ("txt_null_heavy",)
    # One long or random-looking name, asked again and again, is not a tunnel ...
    for _ in range(5):
        assert d.observe("b2", "a" * 60 + ".evil.example", "A", ts) is None
        assert d.observe("b2", "0f3a9c5e7b1d2468ace0f3a9c5e7b1d2.r2.store.example", "A",
                         ts) is None
    # ... three different ones under one parent are.
    assert d.observe("b2", "b" * 60 + ".evil.example", "A", ts) is None
    long_label = d.observe("b2", "c" * 60 + ".evil.example", "A", ts)
    assert long_label is not None and long_label.reasons == ("long_label",)
    assert "cccccccc...[60 chars]" in long_label.sample


def test_hex_payloads_are_data_like_whatever_their_entropy() -> None:
    low = "0123456789" * 3  # 30 hex digits, 3.32 bits a character
    assert entropy(low) < 3.5 and data_like(low + ".t.example")
    assert not data_like("deadbeef.t.example")  # too short to say
