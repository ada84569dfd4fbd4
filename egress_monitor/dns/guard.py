"""The DNS guard's decisions: who asked, may they, what did the answer say (glue).

The resolver thread has :meth:`DnsGuard.begin` and :meth:`DnsGuard.complete` run on the
daemon's main loop (through its mailbox), so the process tree, the knowledge and the sinks are
only ever touched by the one thread that owns them. Knowledge from an answer is recorded
inside ``complete``, which returns before the answer is sent: the connection that follows is
already known by its name.

Refused names (enforce mode) get NXDOMAIN, with an Extended DNS Error "Blocked" when the
client sent EDNS: NXDOMAIN ends the lookup at once with "could not resolve host", where
REFUSED makes stub resolvers try the next server (the same daemon again, through the same
redirect) and report a temporary failure that tools retry. A refused name is never sent
upstream. In audit mode it is forwarded and the record says what enforce mode would do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from egress_monitor import attribution
from egress_monitor.alerts import Alert, raise_alert
from egress_monitor.builds import Build
from egress_monitor.detect.secrets import SecretHit
from egress_monitor.dns.knowledge import Knowledge
from egress_monitor.dns.message import (
    MalformedMessage,
    Query,
    error_response,
    parse_answer,
    parse_query,
)
from egress_monitor.dns.server import Plan
from egress_monitor.dns.tunnel import TunnelDetector, data_like, redact
from egress_monitor.policy.engine import Decision
from egress_monitor.process_tree import Node
from egress_monitor.sinks.metrics import Metrics

FORMERR = 1
REFUSED = 5
NXDOMAIN = 3
QTYPE_LABELS = frozenset({"A", "AAAA", "CNAME", "TXT", "MX", "SRV", "HTTPS", "SVCB", "NS",
                          "PTR", "SOA", "ANY", "NULL", "CAA"})
Owner = Callable[[tuple[str, int], str], tuple[Node | None, Build | None]]
NameDecider = Callable[[str, Node | None, Build], Decision]
SecretFinder = Callable[[Build, bytes, str], SecretHit | None]


@dataclass(slots=True)
class _Asked:
    query: Query
    owner: Node | None
    build: Build | None
    transport: str
    allowed: bool
    action: str
    rule: str


class DnsGuard:
    """Implements the resolver's hooks against the daemon's state."""

    def __init__(self, *, owner: Owner, knowledge: Knowledge,
                 detector: TunnelDetector, metrics: Metrics,
                 emit: Callable[[dict[str, Any] | Alert], None], decide_name: NameDecider,
                 mode: Callable[[], str], clock_ns: Callable[[], int],
                 wall: Callable[[], float], secrets: SecretFinder | None = None) -> None:
        self._owner = owner
        self.knowledge = knowledge
        self.detector = detector
        self._metrics = metrics
        self._emit = emit
        self._decide_name = decide_name
        self._mode = mode
        self._clock = clock_ns
        self._wall = wall
        self._secrets = secrets

    def begin(self, wire: bytes, client: tuple[str, int], transport: str) -> Plan:
        """Parse, attribute, check for tunnels, decide."""
        try:
            query = parse_query(wire)
        except MalformedMessage:
            self._metrics.dns_malformed.inc()
            # Never forwarded: what cannot be answered (a response, under 12 bytes) is dropped.
            formerr = error_response(wire, FORMERR)
            return Plan(respond=formerr, drop=formerr is None)
        owner, build = self._owner(client, transport)
        if build is None:
            # Only builds' DNS is redirected here, so a query nobody can be found for is a
            # build's whose socket is already gone (send and close): it cannot be judged, so
            # it is refused and never forwarded (a name could carry a secret).
            self._metrics.dns_unattributed.inc()
            refused = error_response(wire, REFUSED)
            return Plan(respond=refused, drop=refused is None)
        role = attribution.role_of(owner)
        detection = self.detector.observe(build.id, query.name, query.qtype, self._clock())
        if detection is not None:
            self._metrics.dns_tunnels.labels(str(role)).inc()
            found = {"parent": detection.parent, "reasons": list(detection.reasons),
                     "count": detection.count, "unique_names": detection.unique_names,
                     "sample": detection.sample}
            ts = attribution.rfc3339(self._wall())
            self._emit({"ts": ts, "type": "dns_tunnel",
                        "schema": attribution.SCHEMA_VERSION, **found,
                        **attribution.actor(owner, build)})
            self._emit(raise_alert(wall=self._wall(), kind="dns_tunnel", severity="critical",
                                   evidence=found, owner=owner, build=build))
        decision = self._decide_name(query.name, owner, build)
        # Labels are at most 63 bytes: an encoded value is split across them.
        wire_name = query.name.encode("utf-8", "surrogatepass")
        hit = self._secrets(build, wire_name + b"\0" + wire_name.replace(b".", b""),
                            str(role)) if self._secrets is not None else None
        if hit is not None:
            # A secret's value in a name: the query itself carries it to the name's
            # servers, so enforce mode answers it here and never forwards it.
            self._emit(raise_alert(
                wall=self._wall(), kind="secret_value", severity="critical",
                owner=owner, build=build, blocked=self._mode() == "enforce",
                evidence={"protocol": "dns", "secret_names": list(hit.names),
                          "encodings": list(hit.encodings),
                          "query": {"type": query.qtype, "transport": transport}}))
            decision = Decision("deny", "secret-value", "the name carries a secret value")
        allowed = decision.action in ("allow", "alert")
        asked = _Asked(query, owner, build, transport, allowed, decision.action,
                       decision.rule)
        if not allowed and self._mode() == "enforce":
            self._record(asked, decision="deny", rcode="NXDOMAIN", answers=None,
                         upstream=None, latency_s=None)
            return Plan(respond=error_response(wire, NXDOMAIN, blocked=True))
        return Plan(respond=None, context=asked, client_id=query.id,
                    udp_payload=query.udp_payload)

    def complete(self, context: Any, response: bytes | None, upstream: str | None,
                 latency_s: float) -> None:
        """Learn the answer's addresses for the build, then record the query."""
        self._metrics.dns_upstream_latency.observe(latency_s)
        if not isinstance(context, _Asked):
            return
        answer = None
        if response is not None:
            try:
                answer = parse_answer(response, context.query.name)
            except MalformedMessage:
                self._metrics.dns_malformed.inc()
        if answer is not None and answer.addresses and context.build is not None \
                and context.build.ended_ns is None:
            self.knowledge.learn(context.build.id, answer.addresses, answer.names,
                                 answer.ttl, self._clock())
        rcode = answer.rcode if answer else ("SERVFAIL" if response is None else "FORMERR")
        self._record(context, decision="allow", rcode=rcode, answers=answer,
                     upstream=upstream, latency_s=latency_s)

    def _record(self, asked: _Asked, *, decision: str, rcode: str, answers: Any,
                upstream: str | None, latency_s: float | None) -> None:
        assert asked.build is not None
        role = attribution.role_of(asked.owner)
        qtype = asked.query.qtype if asked.query.qtype in QTYPE_LABELS else "other"
        self._metrics.dns_queries.labels(str(role), qtype, decision).inc()
        name = asked.query.name
        hidden = data_like(name)
        chain = list(answers.names[1:]) if answers else []
        self._emit({
            "ts": attribution.rfc3339(self._wall()), "type": "dns",
            "schema": attribution.SCHEMA_VERSION, "decision": decision,
            "policy_decision": asked.action, "rule": asked.rule,
            "mode": self._mode(),
            "query": {"name": redact(name) if hidden else name, "name_redacted": hidden,
                      "type": asked.query.qtype, "transport": asked.transport},
            "rcode": rcode, "answers": list(answers.addresses) if answers else [],
            "cnames": [redact(n) if data_like(n) else n for n in chain],
            "ttl": answers.ttl if answers else None, "upstream": upstream,
            "upstream_ms": round(latency_s * 1000, 3) if latency_s is not None else None,
            **attribution.actor(asked.owner, asked.build),
        })
