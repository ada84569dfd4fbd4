"""The JSON event contract (golden), including a flow whose owner could not be found."""

from __future__ import annotations

import json

from egress_monitor import attribution
from egress_monitor.builds import BuildRegistry
from egress_monitor.events import ExecInfo, FlowKey, Protocol
from egress_monitor.process_tree import Node
from egress_monitor.roles import Crate, Role

WALL = 1795462898.5


def sample() -> tuple[Node, Node, FlowKey]:
    root = Node(pid=100, parent=None, info=ExecInfo(exe="/usr/bin/cargo",
                                                     argv=("cargo", "build"), cwd="/w"))
    build = BuildRegistry(31000, 4).start(root, ts_ns=0, wall=WALL, via="cargo")
    build.root_exe, build.cwd = "/usr/bin/cargo", "/w"
    root.build, root.role = build, Role.CARGO
    script = Node(pid=101, parent=root, build=build, role=Role.BUILD_SCRIPT,
                  crate=Crate("evil-dep", "0.3.10"),
                  info=ExecInfo(exe="/w/target/debug/build/evil-dep-0123456789abcdef/"
                                "build-script-build", argv=("build-script-build",), uid=1000))
    flow = FlowKey(4, Protocol.TCP, 6, "192.0.2.10", 40000, "198.51.100.2", 80)
    return root, script, flow


GOLDEN = {
    "ts": "2026-11-23T19:41:38.500000Z", "type": "connection", "schema": 1,
    "decision": "allow", "mode": "audit", "protocol": "tcp", "family": "ipv4",
    "src": {"ip": "192.0.2.10", "port": 40000},
    "dst": {"ip": "198.51.100.2", "port": 80, "names": []},
    "process": {"pid": 101, "exe": "/w/target/debug/build/evil-dep-0123456789abcdef/"
                "build-script-build", "argv": ["build-script-build"], "uid": 1000},
    "lineage": [{"pid": 100, "exe": "/usr/bin/cargo"},
                {"pid": 101, "exe": "/w/target/debug/build/evil-dep-0123456789abcdef/"
                 "build-script-build"}],
    "role": "build-script", "crate": {"name": "evil-dep", "version": "0.3.10"},
    "attribution": "process",
    "build": {"id": "1a209eda344-100", "root_pid": 100, "root_exe": "/usr/bin/cargo",
              "cwd": "/w"},
}


def test_connection_event_golden() -> None:
    root, script, flow = sample()
    assert root.build is not None
    event = attribution.connection_event(wall=WALL, flow=flow, owner=script, build=root.build,
                                         decision="allow", mode="audit")
    assert event == GOLDEN
    json.dumps(event)  # serialisable as is


def test_owner_not_found_is_still_recorded_against_the_build() -> None:
    root, _script, flow = sample()
    assert root.build is not None
    event = attribution.connection_event(wall=WALL, flow=flow, owner=None, build=root.build,
                                         decision="allow", mode="audit")
    assert event["role"] == "other" and event["process"] is None and event["lineage"] == []
    assert event["attribution"] == "build" and event["crate"] is None
    assert event["build"] == GOLDEN["build"]


def test_build_end_summary() -> None:
    root, _script, _flow = sample()
    build = root.build
    assert build is not None
    build.record_connection("build-script", "allow", "deny")  # audit: enforce would refuse
    build.record_connection("build-script", "allow", "kill-build")
    build.record_connection("cargo", "allow", "allow")
    build.record_connection("cargo", "deny", "deny")  # refused already: not a would-be
    build.processes_seen = 7
    event = attribution.build_end_event(wall=WALL, build=build, now_ns=2_500_000_000)
    assert event["summary"] == {
        "duration_s": 2.5, "processes": 7, "connections": 4,
        "connections_by_role": {"build-script": {"allow": 2},
                                "cargo": {"allow": 1, "deny": 1}},
        "policy_decisions_by_role": {"build-script": {"deny": 1, "kill-build": 1},
                                     "cargo": {"allow": 1, "deny": 1}},
        "would_be_denied": 2, "build_scripts": [], "killed_by_rule": None}
