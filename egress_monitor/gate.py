"""The gate's decision for a new flow of a build (pure): what the queue verdict is.

Packet facts and the policy's decision in, a :class:`GateVerdict` out; the daemon only applies
it (queue verdict and mark, sinkhole bookkeeping, cgroup.kill) and records it. The table:

============================  ========  =============  ==========  ===========  =====
case                          mode      policy action  protocol    verdict      kill
============================  ========  =============  ==========  ===========  =====
DNS over TLS / QUIC (853)     any       any            tcp, udp    reset        no
allowed or alert              any       allow, alert   any         accept       no
would be denied               audit     deny, kill     any         accept       no
denied, a TCP SYN              enforce   deny           tcp         sinkhole     no
denied, any other TCP packet  enforce   deny           tcp         reset        no
denied                        enforce   deny           udp, icmp   reset        no
kill-build                    enforce   kill-build     any         reset        yes
============================  ========  =============  ==========  ===========  =====

Only a SYN is judged in nat, where a repeated packet can still be redirected: any other TCP
packet judged as a new flow (one conntrack cannot place, or a data packet of a flow the daemon
does not know, e.g. opened before a restart) comes back through filter, so it is reset; with
``SINK_MARK`` it would be queued again forever.

"reset" is a repeat with ``DENY_MARK``: the chain's first rules answer a TCP reset or ICMP
administratively prohibited, so the process fails at once. "sinkhole" is a repeat with
``SINK_MARK``: nat redirects the connection to the daemon's sinkhole, which records what the
process tried to send and resets it. Packets the daemon cannot judge at all (malformed, of a
build that has ended, or met by an internal error) never reach :func:`judge`: the daemon drops
or resets them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from egress_monitor.enforce.rules import DENY_MARK, SINK_MARK
from egress_monitor.events import Protocol
from egress_monitor.policy.engine import Decision

Outcome = Literal["accept", "sinkhole", "reset"]
DOT_PORT = 853
DOT = Decision("deny", "dns-over-tls", "DNS over TLS is refused")


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """What to do with a held first packet, and what to record about it."""

    outcome: Outcome
    decision: Decision  # the policy's answer (or the built-in refusal that replaced it)
    reason: str | None = None  # a built-in refusal's name ("dns-over-tls"), else None
    kill_build: bool = False

    @property
    def refused(self) -> bool:
        """Whether the flow does not go where it was headed."""
        return self.outcome != "accept"

    @property
    def mark(self) -> int | None:
        """The packet mark to set with the repeat verdict, if any."""
        return {"sinkhole": SINK_MARK, "reset": DENY_MARK}.get(self.outcome)

    @property
    def blocked_alert(self) -> bool:
        """Whether this refusal is itself reported as a ``blocked_attempt`` alert now.

        A sinkholed connection is reported by the sinkhole, with what it tried to send;
        built-in refusals (DNS over TLS) are policy-independent and recorded, not alerted.
        """
        return self.outcome == "reset" and self.reason is None


def builtin_refusal(protocol: Protocol, dst_port: int) -> Decision | None:
    """A refusal that holds in every mode, whatever the policy says, or None."""
    if dst_port == DOT_PORT and protocol in (Protocol.TCP, Protocol.UDP):
        # DNS over TLS (or QUIC) would take names past the DNS guard: no build needs it,
        # and audit could not see what it resolved.
        return DOT
    return None


def judge(protocol: Protocol, mode: str, decision: Decision,
          builtin: Decision | None = None, syn: bool = True) -> GateVerdict:
    """The verdict for a new flow, given the policy's ``decision`` for it (see the table);
    ``syn`` says whether a TCP packet is a connection's SYN."""
    if builtin is not None:
        return GateVerdict("reset", builtin, reason=builtin.rule)
    if mode != "enforce" or decision.action in ("allow", "alert"):
        return GateVerdict("accept", decision)
    if decision.action == "kill-build":
        return GateVerdict("reset", decision, kill_build=True)
    if protocol is Protocol.TCP and syn:
        return GateVerdict("sinkhole", decision)
    return GateVerdict("reset", decision)


def content_refusal(decision: Decision, reason: str) -> GateVerdict:
    """The verdict for a first packet the policy allows but whose own data enforce mode
    refuses (a secret's value in a first datagram, data in a SYN): a reset, reported by the
    inspection that found it (so no ``blocked_attempt`` of its own)."""
    return GateVerdict("reset", decision, reason=reason)
