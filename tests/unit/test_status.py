"""status.py: what the daemon remembers of the records it writes, and the status text."""

from __future__ import annotations

from collections import deque
from typing import Any

from egress_monitor.status import remember, render

BUILD = {"id": "b1", "root_pid": 10, "root_exe": "/usr/bin/cargo", "cwd": "/w"}
DST = {"ip": "198.51.100.2", "port": 8080, "names": ["attacker.example"]}


def lists() -> tuple[deque[dict[str, Any]], deque[dict[str, Any]], deque[dict[str, Any]]]:
    return deque(maxlen=3), deque(maxlen=3), deque(maxlen=3)


def test_alerts_keep_the_destination_from_their_evidence() -> None:
    alerts, would, builds = lists()
    sunk = {"ts": "t1", "type": "alert", "kind": "blocked_attempt", "role": "build-script",
            "crate": {"name": "evil-dep", "version": "0.3.10"}, "rule": "default:build-script",
            "evidence": {"dst": DST, "method": "POST"}, "build": BUILD}
    remember(sunk, alerts=alerts, would_deny=would, builds=builds)
    assert alerts[0]["dst"] == DST and alerts[0]["kind"] == "blocked_attempt"
    assert not would and not builds


def test_connections_go_to_refusals_or_would_be_denials_and_allowed_ones_nowhere() -> None:
    alerts, would, builds = lists()
    base = {"ts": "t", "type": "connection", "role": "build-script", "crate": None,
            "dst": DST, "rule": "default:build-script", "build": BUILD}
    remember({**base, "decision": "deny", "policy_decision": "deny"}, alerts=alerts,
             would_deny=would, builds=builds)
    remember({**base, "decision": "allow", "policy_decision": "kill-build"}, alerts=alerts,
             would_deny=would, builds=builds)
    remember({**base, "decision": "allow", "policy_decision": "allow"}, alerts=alerts,
             would_deny=would, builds=builds)
    assert [a["kind"] for a in alerts] == ["refused"]
    assert [w["kind"] for w in would] == ["would_deny"] and would[0]["dst"] == DST


def test_finished_builds_and_the_text() -> None:
    alerts, would, builds = lists()
    end = {"ts": "t9", "type": "build_end", "build": BUILD,
           "summary": {"duration_s": 1.5, "processes": 4, "would_be_denied": 2,
                       "connections_by_role": {"cargo": {"allow": 1},
                                               "build-script": {"allow": 2, "deny": 1}},
                       "killed_by_rule": None}}
    remember(end, alerts=alerts, would_deny=would, builds=builds)
    remember({"ts": "t8", "type": "connection", "decision": "deny", "role": "other",
              "dst": {"ip": "2001:db8::2", "port": 443, "names": []}, "rule": "r",
              "build": BUILD}, alerts=alerts, would_deny=would, builds=builds)
    assert builds[0]["connections"] == {"allow": 3, "deny": 1, "would_deny": 2}
    text = render({"pid": 1, "uptime_s": 5, "mode": "audit", "runner": "r1",
                   "policy": {"source": "p.yaml", "digest": "ab" * 32, "rules": 2},
                   "builds": [], "finished": list(builds), "last_alerts": list(alerts),
                   "would_deny": []})
    assert "  b1  cargo  /w  ended t9  1.5s  connections 3 allowed, 1 denied, 2 would be " \
        "denied by enforce" in text
    assert "  t8  refused  other  -  [2001:db8::2]:443  r  build b1" in text
