"""Alert shapes for Alertmanager, de-duplication, and the dashboard's and rules' metrics."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from egress_monitor.sinks.alertmanager import AlertmanagerSink, summary, to_alert
from egress_monitor.sinks.metrics import Metrics

REPO = Path(__file__).parents[2]
BLOCKED: dict[str, Any] = {
    "ts": "2026-11-23T19:41:38.500000Z", "type": "alert", "kind": "blocked_attempt",
    "severity": "critical", "rule": "default:build-script",
    "evidence": {"protocol": "tcp", "decision": "deny",
                 "dst": {"ip": "198.51.100.2", "port": 80, "names": ["attacker.example"]}},
    "process": {"pid": 101, "exe": "/w/build-script-build", "argv": [], "uid": 1000},
    "lineage": [{"pid": 100, "exe": "/usr/bin/cargo"}, {"pid": 101,
                                                        "exe": "/w/build-script-build"}],
    "role": "build-script", "crate": {"name": "evil-dep", "version": "0.3.10"},
    "attribution": "process",
    "build": {"id": "b-1", "root_pid": 100, "root_exe": "/usr/bin/cargo", "cwd": "/w"},
}


def test_alert_labels_and_summary() -> None:
    alert = to_alert(BLOCKED, "runner-7", datetime(2026, 11, 23, 19, 41, 38, tzinfo=UTC))
    assert alert["labels"] == {"alertname": "EgressMonitorBlockedAttempt",
                               "severity": "critical", "runner": "runner-7",
                               "kind": "blocked_attempt", "role": "build-script",
                               "crate": "evil-dep", "build": "b-1"}
    assert alert["annotations"]["summary"] == (
        "blocked: build-script of evil-dep 0.3.10 tried to 198.51.100.2:80 "
        "(attacker.example), refused by rule default:build-script")
    sunk = dict(BLOCKED, evidence={"method": "POST", "content_length": 3100,
                                   "secret_names": ["AWS_SECRET_ACCESS_KEY"],
                                   "dst": BLOCKED["evidence"]["dst"]})
    assert summary(sunk) == (
        "blocked: build-script of evil-dep 0.3.10 tried to POST 3.1 kB containing "
        "AWS_SECRET_ACCESS_KEY to 198.51.100.2:80 (attacker.example), refused by rule "
        "default:build-script")
    assert alert["annotations"]["lineage"] == "/usr/bin/cargo[100] -> /w/build-script-build[101]"
    assert alert["annotations"]["workspace"] == "/w"
    assert alert["startsAt"] == "2026-11-23T19:41:38.000000Z"
    tunnel = {"type": "dns_tunnel", "parent": "attacker.example", "count": 41,
              "reasons": ["high_entropy"], "role": "other", "crate": None}
    assert summary(tunnel) == ("other: DNS tunnel-shaped queries under attacker.example "
                               "(41 queries, high_entropy)")


def test_dedup_and_a_full_queue_never_block() -> None:
    drops: list[int] = []
    sink = AlertmanagerSink(["http://127.0.0.1:9"], "r", max_queue=2,
                            on_drop=lambda: drops.append(1))
    for _ in range(5):  # not started: the queue fills, the rest are dropped and counted
        sink.submit(BLOCKED)
    assert len(drops) == 3
    sink._add(BLOCKED)
    sink._add(BLOCKED)  # same labels within the window: sent once
    assert len(sink._pending["http://127.0.0.1:9/api/v2/alerts"]) == 1


def metric_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
    text = generate_latest(registry).decode()
    names.update(re.findall(r"^# TYPE (\S+)", text, re.M))
    for base in list(names):  # counters and histograms are queried by their series names
        names.update({f"{base}_total", f"{base}_bucket", f"{base}_sum", f"{base}_count"})
    return names


def test_dashboard_and_rules_only_query_metrics_that_exist() -> None:
    known = metric_names() | {"up"}
    dash = json.loads((REPO / "deploy" / "grafana" / "egress-monitor.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    rules = (REPO / "deploy" / "prometheus" / "alerts.yml").read_text()
    exprs += re.findall(r"expr: (.+)", rules)
    used = {m for e in exprs for m in re.findall(r"\b(egress_monitor_[a-z_]+|up)\b", e)}
    assert used and used <= known, sorted(used - known)
    assert {p["title"] for p in dash["panels"]} >= {
        "Builds running", "New connections by role and decision", "Top alert kinds (24h)",
        "Verdict latency", "DNS queries by role and decision"}
