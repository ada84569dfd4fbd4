"""The Grafana dashboard asks only for series the daemon exports, and shows what operators
look for per runner."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from egress_monitor.sinks.metrics import Metrics

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "egress-monitor.json"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
            "info": ("_info",), "summary": ("_sum", "_count")}


def exported() -> set[str]:
    """Every series name the daemon's registry can expose, from the registry itself."""
    names = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        for suffix in SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return names


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in panels(board["panels"])
           for t in p.get("targets", [])]
    out += [(v["name"], v["query"]) for v in board["templating"]["list"]
            if v.get("type") == "query"]
    return out


def test_every_query_names_only_exported_metrics() -> None:
    known = exported() | {"up"}
    assert "egress_monitor_would_be_denied_total" in known  # the registry, not a hand list
    found = 0
    for title, expr in queries():
        names = set(re.findall(r"\b(egress_monitor_[a-z_]+|up)\b(?=\s*[{\[(),)]|\s*$)", expr))
        assert names, f"{title}: no metric in {expr!r}"
        found += len(names)
        assert names <= known, f"{title}: {sorted(names - known)} are not exported"
    assert found >= 20


def test_per_runner_panels() -> None:
    exprs = {title: expr for title, expr in queries()}
    per_runner = {t: e for t, e in exprs.items() if "by (instance" in e}
    wanted = ("egress_monitor_builds_total", "egress_monitor_connections_total",
              "egress_monitor_would_be_denied_total", "egress_monitor_exfil_attempts_total",
              "egress_monitor_verdict_latency_seconds_bucket")
    for metric in wanted:
        assert any(metric in e for e in per_runner.values()), f"no per-runner panel of {metric}"
