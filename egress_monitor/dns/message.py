"""DNS wire handling for the guard (pure): read a query, read an answer, build refusals.

Answers from upstream are passed to the build as they came, byte for byte, apart from the
message id (restored to the client's) and truncation to the client's UDP size; this module
only *reads* them, with dnspython, to learn which addresses a name stands for.

Total: :func:`parse_query` and :func:`parse_answer` return a value or raise
:class:`MalformedMessage`, and nothing else, for any bytes (whatever dnspython raises on bytes
it cannot read counts as malformed: it is outside code, and a parser must not let it through);
:func:`error_response`, :func:`truncated` and :func:`with_id` never raise.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

_HEADER = struct.Struct("!HHHHHH")
FLAG_QR = 0x8000
FLAG_TC = 0x0200
EDE_BLOCKED = 15  # RFC 8914 "Blocked"


class MalformedMessage(ValueError):
    """Bytes that are not a DNS message of the expected kind."""


@dataclass(frozen=True, slots=True)
class Query:
    """One question from a build."""

    id: int
    name: str  # lower case, no trailing dot; "." for the root
    qtype: str  # "A", "AAAA", "TXT", "TYPE65534" ...
    udp_payload: int  # the largest UDP answer the client takes (512 without EDNS)
    has_edns: bool


@dataclass(frozen=True, slots=True)
class Answer:
    """What an upstream answer says about the question's name."""

    rcode: str  # "NOERROR", "NXDOMAIN", ...
    truncated: bool
    addresses: tuple[str, ...]  # A and AAAA at the end of the CNAME chain
    names: tuple[str, ...]  # the question's name, then each CNAME target in order
    ttl: int  # the smallest TTL among the records used (0 when there are none)


def _name(n: dns.name.Name) -> str:
    text: str = n.to_text(omit_final_dot=True).lower()
    return text or "."


def _from_wire(wire: bytes, what: str) -> dns.message.Message:
    try:
        return dns.message.from_wire(wire)
    except Exception as exc:  # any failure of outside code on these bytes
        raise MalformedMessage(f"unparseable {what}: {type(exc).__name__}") from None


def parse_query(wire: bytes) -> Query:
    """A standard query with exactly one question of class IN; anything else raises
    MalformedMessage."""
    msg = _from_wire(wire, "query")
    if msg.flags & dns.flags.QR:
        raise MalformedMessage("a response, not a query")
    if msg.opcode() != dns.opcode.QUERY:
        raise MalformedMessage(f"opcode {dns.opcode.to_text(msg.opcode())}")
    if len(msg.question) != 1:
        raise MalformedMessage(f"{len(msg.question)} questions")
    question = msg.question[0]
    if question.rdclass != dns.rdataclass.IN:
        raise MalformedMessage(f"class {int(question.rdclass)}, not IN")
    has_edns = msg.edns >= 0
    return Query(id=msg.id, name=_name(question.name),
                 qtype=dns.rdatatype.to_text(question.rdtype),
                 udp_payload=max(512, min(msg.payload, 65535)) if has_edns else 512,
                 has_edns=has_edns)


def parse_answer(wire: bytes, qname: str) -> Answer:
    """Follow the CNAME chain from ``qname`` and collect its addresses (records of a class
    other than IN are ignored)."""
    msg = _from_wire(wire, "answer")
    chain = [qname]
    addresses: list[str] = []
    ttls: list[int] = []
    current = qname
    for _ in range(16):  # bounded: a CNAME loop cannot hold us
        target = None
        for rrset in msg.answer:
            if rrset.rdclass != dns.rdataclass.IN or _name(rrset.name) != current:
                continue
            if rrset.rdtype == dns.rdatatype.CNAME:
                target = _name(rrset[0].target)
                ttls.append(rrset.ttl)
            elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                ttls.append(rrset.ttl)
                addresses.extend(str(ipaddress.ip_address(rd.address)) for rd in rrset)
        if target is None or target in chain:
            break
        chain.append(target)
        current = target
    return Answer(rcode=dns.rcode.to_text(msg.rcode()), truncated=bool(msg.flags & FLAG_TC),
                  addresses=tuple(dict.fromkeys(addresses)), names=tuple(chain),
                  ttl=min(ttls) if ttls else 0)


def with_id(wire: bytes, msg_id: int) -> bytes:
    """The same message with another id (upstream ids are the daemon's own)."""
    return struct.pack("!H", msg_id) + wire[2:]


def truncated(response: bytes) -> bytes:
    """The header and question of a response with TC set: "ask again over TCP" (only the
    header when the question cannot be read)."""
    msg_id, flags, qd, _an, _ns, _ar = _HEADER.unpack(response[:12].ljust(12, b"\0"))
    try:
        question_end = _question_end(response, qd)
    except MalformedMessage:
        return _HEADER.pack(msg_id, flags | FLAG_TC, 0, 0, 0, 0)
    return _HEADER.pack(msg_id, flags | FLAG_TC, qd, 0, 0, 0) + response[12:question_end]


def _question_end(wire: bytes, count: int) -> int:
    offset = 12
    for _ in range(count):
        while True:
            if offset >= len(wire):
                raise MalformedMessage("question runs past the message")
            length = wire[offset]
            if length & 0xC0 == 0xC0:
                offset += 2
                break
            offset += 1 + length
            if length == 0:
                break
        offset += 4
    if offset > len(wire):
        raise MalformedMessage("question runs past the message")
    return offset


def error_response(query_wire: bytes, rcode: int, *, blocked: bool = False) -> bytes | None:
    """An answer with ``rcode`` to a query (None when not even a header can be read).

    ``blocked`` adds an Extended DNS Error "Blocked" (RFC 8914) naming the daemon, for
    clients that sent EDNS.
    """
    if len(query_wire) < 12 or query_wire[2] & 0x80:
        # Too short to answer, or a response sent as a query: never answer a response.
        return None
    try:
        query = dns.message.from_wire(query_wire)
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.Rcode(rcode))
        if blocked and query.edns >= 0:
            response.use_edns(0, payload=max(512, min(query.payload, 65535)), options=[
                dns.edns.EDEOption(dns.edns.EDECode(EDE_BLOCKED), "egress-monitor policy")])
        wire: bytes = response.to_wire()
        return wire
    except Exception:  # outside code on hostile bytes: a header-only answer
        msg_id, flags = struct.unpack_from("!HH", query_wire)
        opcode_bits = flags & 0x7800
        return _HEADER.pack(msg_id, FLAG_QR | opcode_bits | (flags & 0x0100) | (rcode & 0xF),
                            0, 0, 0, 0)
