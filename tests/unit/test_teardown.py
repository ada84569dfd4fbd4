"""The daemon's exit path: running builds stay refused; only an idle stop removes everything."""

from __future__ import annotations

from collections.abc import Callable
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


class VerdictQueue:
    def __init__(self, fail_first: bool = False) -> None:
        self.verdicts: list[tuple[int, int | None]] = []
        self.fail_first = fail_first

    def verdict(self, queue: int, packet_id: int, verdict: int, mark: int | None = None) -> None:
        if self.fail_first:
            self.fail_first = False
            raise OSError("netlink send failed")
        self.verdicts.append((verdict, mark))


def held(tmp_path: Path, decide: Callable[..., None],
         queue: VerdictQueue) -> list[tuple[int, int | None]]:
    from egress_monitor.events import QueuedPacket

    d = Daemon(DaemonConfig(events_path=str(tmp_path / "e.jsonl")), CollectorRegistry())
    d.queue = queue  # type: ignore[assignment]
    d._decide = decide  # type: ignore[method-assign]
    d._held(QueuedPacket(queue=31000, packet_id=7, payload=b"", received_ns=0))
    return queue.verdicts


def test_a_packet_whose_judgement_fails_gets_one_refusing_verdict(tmp_path: Path) -> None:
    from egress_monitor.enforce.rules import DENY_MARK
    from egress_monitor.sources.nfqueue import NF_ACCEPT, NF_REPEAT

    def before(packet: object, verdict: object) -> None:
        raise ValueError("hostile bytes")

    assert held(tmp_path, before, VerdictQueue()) == [(NF_REPEAT, DENY_MARK)]

    def after(packet: object, verdict: Callable[..., None]) -> None:
        verdict(NF_ACCEPT)
        raise ValueError("failed while recording")

    assert held(tmp_path, after, VerdictQueue()) == [(NF_ACCEPT, None)]  # never a second one

    def send_fails(packet: object, verdict: Callable[..., None]) -> None:
        verdict(NF_ACCEPT)  # the send raises: nothing was sent, so the packet is refused

    assert held(tmp_path, send_fails, VerdictQueue(fail_first=True)) == [(NF_REPEAT, DENY_MARK)]
