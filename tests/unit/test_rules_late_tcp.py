"""``render(late_tcp=True)`` (a namespace gate's ruleset): TCP connections that nat never
judged are judged in filter, a sinkhole refusal nat cannot redirect is a reset, and without
the option the ruleset is exactly the host's."""

from __future__ import annotations

from egress_monitor.enforce.rules import FLOW_MARK, SINK_MARK, BuildRule, MarkGate, render

RULES = [BuildRule("/egress-build-q31001-18bd-77", 31001)]
GATE = MarkGate(0x80000000, 0x80000000, 31512)


def test_late_tcp_rules_and_their_order() -> None:
    base = render(RULES, 4, 15353, sink_port=15354, mark_gate=GATE).splitlines()
    late = render(RULES, 4, 15353, sink_port=15354, mark_gate=GATE,
                  late_tcp=True).splitlines()
    added = [line for line in late if line not in base]
    cg = '-m cgroup --path "/egress-build-q31001-18bd-77"'
    unjudged = f"-m conntrack --ctstate NEW -m connmark ! --mark {FLOW_MARK:#x}/{FLOW_MARK:#x}"
    sink_reset = f"-A EGRESS-MON -m mark --mark {SINK_MARK:#x} -p tcp -j REJECT " \
        "--reject-with tcp-reset"
    assert added == [
        sink_reset,
        f"-A EGRESS-MON {cg} -p tcp {unjudged} -j NFQUEUE --queue-num 31001",
        f"-A EGRESS-MON -m mark --mark 0x80000000/0x80000000 -p tcp {unjudged}"
        " -j NFQUEUE --queue-num 31512"]
    assert [line for line in base if line not in late] == []
    # The reset comes after the sinkhole's own RETURN (a redirected refusal reaches it)
    # and before every queue rule (a refusal coming back is never queued again).
    ret = late.index("-A EGRESS-MON -d 127.0.0.1/32 -p tcp --dport 15354 -j RETURN")
    first_queue = min(i for i, line in enumerate(late)
                      if line.startswith("-A EGRESS-MON ") and "NFQUEUE" in line)
    assert ret < late.index(sink_reset) < first_queue


def test_refusing_renders_have_no_late_queue() -> None:
    text = render(RULES, 4, 15353, sink_port=15354, refuse=True, late_tcp=True)
    assert "NFQUEUE" not in text
