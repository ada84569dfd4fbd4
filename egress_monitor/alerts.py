"""Alerts: one typed record, built here and nowhere else, for every kind the daemon raises.

Every producer (the connection gate, first-data inspection, the sinkhole, uploads, the DNS
tunnel detector, known-bad crates) calls :func:`raise_alert` and hands the result to the
daemon's outputs (:mod:`egress_monitor.sinks.fanout`), which write it to the events file,
deliver it to Alertmanager, keep it for ``status`` and count it, each sink failing alone.

The record's shape is documented in docs/events.md (``type: "alert"``). ``evidence`` holds
shapes and names only (methods, hosts, sizes, names of secret variables), never a value a
build sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from egress_monitor import attribution
from egress_monitor.builds import Build
from egress_monitor.process_tree import Node

Severity = Literal["critical", "warning"]
# The kinds raised today; bounded, since it is a metric label.
KINDS = frozenset({"blocked_attempt", "policy_alert", "http_post", "tls_unlisted_name",
                   "upload", "dns_tunnel", "known_bad_crate", "secret_value",
                   "credential_read", "tamper", "container_engine"})


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert: what kind, how bad, which rule, the evidence and who did it."""

    ts: str
    kind: str
    severity: Severity
    rule: str | None
    evidence: Mapping[str, Any]
    actor: Mapping[str, Any]  # attribution.actor(): process, lineage, role, crate, build
    blocked: bool | None = None  # None: the kind has no such notion (a DNS tunnel)

    @property
    def role(self) -> str:
        """The role of the process that did it (``other`` when it is unknown)."""
        return str(self.actor.get("role") or "other")

    def record(self) -> dict[str, Any]:
        """The ``type: "alert"`` event record."""
        out: dict[str, Any] = {"ts": self.ts, "type": "alert",
                               "schema": attribution.SCHEMA_VERSION, "kind": self.kind,
                               "severity": self.severity, "rule": self.rule,
                               "evidence": dict(self.evidence)}
        if self.blocked is not None:
            out["blocked"] = self.blocked
        out.update(self.actor)
        return out


def raise_alert(*, wall: float, kind: str, severity: Severity, evidence: Mapping[str, Any],
                owner: Node | None = None, build: Build | None = None,
                actor: Mapping[str, Any] | None = None, rule: str | None = None,
                blocked: bool | None = None) -> Alert:
    """Build an alert; ``actor`` (from a connection record) or ``owner`` and ``build``."""
    if actor is None:
        assert build is not None, "an alert needs its build"
        actor = attribution.actor(owner, build)
    return Alert(ts=attribution.rfc3339(wall), kind=kind if kind in KINDS else "other",
                 severity=severity, rule=rule, evidence=dict(evidence), actor=dict(actor),
                 blocked=blocked)


def connection_alert(*, wall: float, connection: Mapping[str, Any], kind: str,
                     severity: Severity) -> Alert:
    """An alert about a connection record: one a rule with ``action: alert`` let through
    (``policy_alert``), or one enforce mode refused (``blocked_attempt``)."""
    keep = ("process", "lineage", "role", "crate", "attribution", "build")
    return raise_alert(wall=wall, kind=kind, severity=severity, rule=connection.get("rule"),
                       evidence={"protocol": connection["protocol"], "dst": connection["dst"],
                                 "decision": connection["decision"]},
                       actor={k: connection[k] for k in keep},
                       blocked=kind == "blocked_attempt")
