"""The gate's decision table (egress_monitor.gate): every row, and the marks it implies."""

from __future__ import annotations

import pytest

from egress_monitor.enforce.rules import DENY_MARK, SINK_MARK
from egress_monitor.events import Protocol
from egress_monitor.gate import DOT, builtin_refusal, judge
from egress_monitor.policy.engine import Decision

TCP, UDP, ICMP = Protocol.TCP, Protocol.UDP, Protocol.ICMP


def d(action: str) -> Decision:
    return Decision(action, f"rule-{action}", "")  # type: ignore[arg-type]


@pytest.mark.parametrize(("protocol", "mode", "action", "outcome", "kill", "alert"), [
    (TCP, "audit", "allow", "accept", False, False),
    (TCP, "audit", "alert", "accept", False, False),
    (TCP, "audit", "deny", "accept", False, False),        # would be denied: recorded only
    (UDP, "audit", "kill-build", "accept", False, False),
    (TCP, "enforce", "allow", "accept", False, False),
    (UDP, "enforce", "alert", "accept", False, False),
    (TCP, "enforce", "deny", "sinkhole", False, False),    # the sinkhole reports it
    (UDP, "enforce", "deny", "reset", False, True),
    (ICMP, "enforce", "deny", "reset", False, True),
    (TCP, "enforce", "kill-build", "reset", True, True),
    (UDP, "enforce", "kill-build", "reset", True, True),
])
def test_policy_rows(protocol: Protocol, mode: str, action: str, outcome: str, kill: bool,
                     alert: bool) -> None:
    verdict = judge(protocol, mode, d(action))
    assert (verdict.outcome, verdict.kill_build, verdict.blocked_alert) == (outcome, kill, alert)
    assert verdict.refused == (outcome != "accept")
    assert verdict.decision == d(action) and verdict.reason is None
    assert verdict.mark == {"accept": None, "sinkhole": SINK_MARK, "reset": DENY_MARK}[outcome]


def test_a_denied_tcp_packet_that_is_not_a_syn_is_reset_not_sinkholed() -> None:
    # It is judged in filter (INVALID, or data of a flow unknown after a restart): a sinkhole
    # mark would send it round the queue again and again.
    verdict = judge(TCP, "enforce", d("deny"), syn=False)
    assert (verdict.outcome, verdict.mark, verdict.blocked_alert) == ("reset", DENY_MARK, True)
    assert judge(TCP, "audit", d("deny"), syn=False).outcome == "accept"


@pytest.mark.parametrize("mode", ["audit", "enforce"])
@pytest.mark.parametrize("protocol", [TCP, UDP])
def test_dns_over_tls_is_reset_in_every_mode_whatever_the_policy(mode: str,
                                                                 protocol: Protocol) -> None:
    builtin = builtin_refusal(protocol, 853)
    assert builtin == DOT
    verdict = judge(protocol, mode, d("allow"), builtin)
    assert (verdict.outcome, verdict.reason, verdict.mark) == ("reset", "dns-over-tls",
                                                                DENY_MARK)
    assert not verdict.blocked_alert and not verdict.kill_build


@pytest.mark.parametrize(("protocol", "port"), [(TCP, 443), (UDP, 53), (ICMP, 853)])
def test_no_builtin_refusal_elsewhere(protocol: Protocol, port: int) -> None:
    assert builtin_refusal(protocol, port) is None
