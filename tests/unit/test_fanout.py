"""Alerts are one typed record fanned out to the sinks; each sink fails alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from egress_monitor.alerts import connection_alert, raise_alert
from egress_monitor.builds import BuildRegistry
from egress_monitor.events import ExecInfo
from egress_monitor.process_tree import Node
from egress_monitor.roles import Role
from egress_monitor.sinks.events_log import EventLog
from egress_monitor.sinks.fanout import Outputs
from egress_monitor.sinks.metrics import Metrics


class Broken:
    def submit(self, record: dict[str, Any]) -> None:
        raise OSError("alertmanager down")


def node() -> Node:
    root = Node(pid=7, parent=None, info=ExecInfo(exe="/x/build-script-build"))
    root.build = BuildRegistry(31000, 2).start(root, ts_ns=0, wall=0.0, via="cargo")
    root.role = Role.BUILD_SCRIPT
    return root


def test_an_alert_reaches_every_sink_even_when_one_fails(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    log = EventLog(str(tmp_path / "events.jsonl"))
    out = Outputs(log, metrics, alertmanager=Broken())
    owner = node()
    assert owner.build is not None
    alert = raise_alert(wall=1_795_462_898.5, kind="http_post", severity="critical",
                        evidence={"method": "POST", "dst": {"ip": "198.51.100.2"}},
                        owner=owner, build=owner.build, blocked=False)
    out.emit(alert)
    log.close()
    [written] = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert written["type"] == "alert" and written["kind"] == "http_post"
    assert written["role"] == "build-script" and written["process"]["pid"] == 7
    assert written["blocked"] is False and written["ts"] == "2026-11-23T19:41:38.500000Z"
    assert out.last_alerts[0]["dst"] == {"ip": "198.51.100.2"}  # from the evidence
    reg = metrics.registry
    assert reg.get_sample_value("egress_monitor_exfil_attempts_total",
                                {"kind": "http_post", "role": "build-script"}) == 1
    assert reg.get_sample_value("egress_monitor_sink_failures_total",
                                {"sink": "alertmanager"}) == 1


def test_unknown_kinds_are_bounded_and_connection_alerts_keep_the_actor() -> None:
    conn: dict[str, Any] = {
            "protocol": "udp", "dst": {"ip": "198.51.100.9", "port": 53}, "decision": "deny",
            "rule": "r1", "process": None, "lineage": [], "role": "rustc", "crate": None,
            "attribution": "build", "build": {"id": "b"}}
    alert = connection_alert(wall=0.0, connection=conn, kind="blocked_attempt",
                             severity="critical")
    rec = alert.record()
    assert rec["rule"] == "r1" and rec["role"] == "rustc" and rec["blocked"] is True
    assert rec["evidence"] == {"protocol": "udp", "dst": conn["dst"], "decision": "deny"}
    owner = node()
    assert owner.build is not None
    odd = raise_alert(wall=0.0, kind="made-up\nkind", severity="warning", evidence={},
                      owner=owner, build=owner.build)
    assert odd.kind == "other" and "blocked" not in odd.record()
