"""The daemon's exit path: running builds stay refused; only an idle stop removes everything."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from egress_monitor.config import DaemonConfig
from egress_monitor.daemon import Daemon
from egress_monitor.enforce.rules import BuildRule
from egress_monitor.events import ExecInfo
from egress_monitor.process_tree import Node


class FakeFirewall:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, list[BuildRule], bool]] = []
        self.fail = fail

    def sync(self, rules: list[BuildRule], refuse: bool = False) -> None:
        self.calls.append(("sync", list(rules), refuse))
        if self.fail:
            raise RuntimeError("iptables-restore failed")

    def remove(self) -> list[str]:
        self.calls.append(("remove", [], False))
        return []


class FakeCgroups:
    def __init__(self, populated: set[str]) -> None:
        self.live = populated
        self.released: list[str] = []

    def populated(self, rel: str) -> bool:
        return rel in self.live

    def release(self, rel: str) -> None:
        self.released.append(rel)


class FakeQueue:
    closed = False

    def close(self) -> None:
        self.closed = True


def daemon_with(tmp_path: Path, builds: dict[str, bool], firewall: FakeFirewall) -> Daemon:
    d = Daemon(DaemonConfig(events_path=str(tmp_path / "e.jsonl")), CollectorRegistry())
    cgroups = FakeCgroups({c for c, live in builds.items() if live})
    for i, cgroup in enumerate(builds):
        root = Node(pid=100 + i, parent=None, info=ExecInfo(exe="/usr/bin/cargo"))
        build = d.registry.start(root, ts_ns=i, wall=0.0, via="cargo")
        build.cgroup = cgroup
    d.firewall, d.cgroups, d.queue = firewall, cgroups, FakeQueue()  # type: ignore[assignment]
    return d


def test_running_builds_get_refusing_rules_and_keep_their_cgroups(tmp_path: Path) -> None:
    fw = FakeFirewall()
    d = daemon_with(tmp_path, {"/b-live": True, "/b-empty": False}, fw)
    d._teardown()
    assert fw.calls == [("sync", [BuildRule("/b-live", 31000)], True)]
    assert d.cgroups.released == ["/b-empty"]  # type: ignore[attr-defined]
    assert d.queue.closed  # type: ignore[attr-defined]


def test_a_stop_with_no_build_running_removes_everything(tmp_path: Path) -> None:
    fw = FakeFirewall()
    d = daemon_with(tmp_path, {"/b-empty": False}, fw)
    d._teardown()
    assert fw.calls == [("remove", [], False)]
    assert d.cgroups.released == ["/b-empty"]  # type: ignore[attr-defined]


def test_a_failing_step_never_releases_a_running_build(tmp_path: Path) -> None:
    fw = FakeFirewall(fail=True)
    d = daemon_with(tmp_path, {"/b-live": True}, fw)
    d._teardown()  # the failure is logged, not raised
    assert d.cgroups.released == []  # type: ignore[attr-defined]
    assert d.queue.closed  # type: ignore[attr-defined]
