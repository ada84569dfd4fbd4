"""The Grafana dashboard shows, per runner, what operators look for. (That every query names
an exported metric is test_alerting.py's test_dashboard_and_rules_only_query_metrics_that_exist,
which reads the names from the daemon's registry.)"""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.test_alerting import metric_names

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "egress-monitor.json"


def test_per_runner_panels_over_exported_metrics() -> None:
    board = json.loads(DASHBOARD.read_text())
    per_runner = [t["expr"] for p in board["panels"] for t in p["targets"]
                  if "by (instance" in t["expr"]]
    wanted = ("egress_monitor_builds_total", "egress_monitor_connections_total",
              "egress_monitor_would_be_denied_total", "egress_monitor_exfil_attempts_total",
              "egress_monitor_verdict_latency_seconds_bucket")
    known = metric_names()
    for metric in wanted:
        assert metric in known, metric
        assert any(metric in e for e in per_runner), f"no per-runner panel of {metric}"
    # The runner picker lists runners by a metric every daemon exports.
    [runner] = [v for v in board["templating"]["list"] if v["name"] == "instance"]
    assert runner["query"] == "label_values(egress_monitor_info, instance)"
    assert "egress_monitor_info" in known
