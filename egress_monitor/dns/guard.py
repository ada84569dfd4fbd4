"""The DNS guard's decisions: who asked, may they, what did the answer say (glue).

The resolver thread calls :meth:`DnsGuard.begin` and :meth:`DnsGuard.complete`; both take
the daemon's state lock, so the process tree, the knowledge and the event log are only ever
touched by one thread at a time. Knowledge from an answer is recorded inside ``complete``,
which returns before the answer is sent: the connection that follows is already known by
its name.

Refused names (enforce mode) get NXDOMAIN, with an Extended DNS Error "Blocked" when the
client sent EDNS: NXDOMAIN ends the lookup at once with "could not resolve host", where
REFUSED makes stub resolvers try the next server (the same daemon again, through the same
redirect) and report a temporary failure that tools retry. A refused name is never sent
upstream. In audit mode it is forwarded and the record says what enforce mode would do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from egress_monitor import attribution
from egress_monitor.builds import Build
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
NXDOMAIN = 3
QTYPE_LABELS = frozenset({"A", "AAAA", "CNAME", "TXT", "MX", "SRV", "HTTPS", "SVCB", "NS",
                          "PTR", "SOA", "ANY", "NULL", "CAA"})
Owner = Callable[[tuple[str, int], str], tuple[Node | None, Build | None]]
NameDecider = Callable[[str, Node | None, Build], Decision]


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

    def __init__(self, *, lock: threading.RLock, owner: Owner, knowledge: Knowledge,
                 detector: TunnelDetector, metrics: Metrics,
                 emit: Callable[[dict[str, Any]], None], decide_name: NameDecider,
                 mode: Callable[[], str], clock_ns: Callable[[], int],
                 wall: Callable[[], float]) -> None:
        self._lock = lock
        self._owner = owner
        self.knowledge = knowledge
        self.detector = detector
        self._metrics = metrics
        self._emit = emit
        self._decide_name = decide_name
        self._mode = mode
        self._clock = clock_ns
        self._wall = wall

    def begin(self, wire: bytes, client: tuple[str, int], transport: str) -> Plan:
        """Parse, attribute, check for tunnels, decide."""
        try:
            query = parse_query(wire)
        except MalformedMessage:
            self._metrics.dns_malformed.inc()
            # Never forwarded: what cannot be answered (a response, under 12 bytes) is dropped.
            formerr = error_response(wire, FORMERR)
            return Plan(respond=formerr, drop=formerr is None)
        with self._lock:
            owner, build = self._owner(client, transport)
            if build is None:
                # Not from a build (a host process asking the loopback port directly):
                # answered like any resolver would, and nothing is recorded.
                return Plan(respond=None, context=None, client_id=query.id,
                            udp_payload=query.udp_payload)
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
                self._emit({"ts": ts, "type": "alert", "schema": attribution.SCHEMA_VERSION,
                            "kind": "dns_tunnel", "severity": "critical", "rule": None,
                            "evidence": found, **attribution.actor(owner, build)})
            decision = self._decide_name(query.name, owner, build)
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
        with self._lock:
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
