"""Container-engine laundering without a kernel: the tables, the hit format, the watch."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from egress_monitor.alerts import Alert
from egress_monitor.bpf import engines as kernel
from egress_monitor.bpf import programs
from egress_monitor.bpf.engines import Hit, parse_hit, path_key
from egress_monitor.builds import Build, BuildRegistry
from egress_monitor.engines import EngineWatch, build_of, cli_of, engine_label, kills, refusing
from egress_monitor.events import ExecInfo
from egress_monitor.policy.loader import PolicyError, parse_policy
from egress_monitor.process_tree import Node
from egress_monitor.roles import Crate, Role
from egress_monitor.sources import engine_sockets as es


def test_labels_and_the_action_table() -> None:
    assert [engine_label(p) for p in ("/var/run/docker.sock", "/run/user/1000/podman/podman.sock",
                                      "/run/containerd/containerd.sock",
                                      "/run/buildkit/buildkitd.sock", "/tmp/x.sock")] == \
        ["docker", "podman", "containerd", "buildkit", "engine"]
    table = {(a, m): (refusing(a, m), kills(a, m)) for a in ("alert", "deny", "kill-build")
             for m in ("audit", "enforce")}
    assert table == {("alert", "audit"): (False, False), ("alert", "enforce"): (False, False),
                     ("deny", "audit"): (False, False), ("deny", "enforce"): (True, False),
                     ("kill-build", "audit"): (False, False),
                     ("kill-build", "enforce"): (True, True)}


def test_policy_key() -> None:
    assert parse_policy("version: 1\n").container_engine == "alert"
    for value in ("alert", "deny", "kill-build"):
        assert parse_policy(f"version: 1\ncontainer_engine: {value}\n").container_engine \
            == value
    with pytest.raises(PolicyError, match="container_engine"):
        parse_policy("version: 1\ncontainer_engine: allow\n")


def test_cli_by_identity_or_name() -> None:
    clis = {(1, 2): "docker"}
    assert cli_of("/opt/x/renamed", None, (1, 2), clis) == "docker"  # a hard link
    assert cli_of("/usr/bin/podman", None, None, clis) == "podman"
    assert cli_of("/usr/bin/kubectl (deleted)", None, (9, 9), clis) == "kubectl"
    assert cli_of("/usr/bin/env", "/usr/local/bin/nerdctl", (9, 9), clis) == "nerdctl"
    assert cli_of("/usr/bin/dockerd-helper", "./make", (9, 9), clis) is None
    assert cli_of(None, None, None, clis) is None


def test_hit_format_is_total() -> None:
    key = kernel.HIT_KEY.pack(42, b"/run/docker.sock")
    value = kernel.HIT.pack(5, programs.member_value(3, programs.ROLE_CRATE), 1,
                            kernel.HIT_REFUSED | kernel.HIT_DATAGRAM)
    assert parse_hit(key, value) == Hit(42, "/run/docker.sock", 5, 3 | 3 << 32, 1, True, True)
    unmatched = parse_hit(key, kernel.HIT.pack(5, 0, kernel.NO_ENGINE, 0))
    assert unmatched is not None and unmatched.engine is None and not unmatched.refused
    assert parse_hit(key[:-1], value) is None and parse_hit(key, value + b"x") is None
    odd = parse_hit(kernel.HIT_KEY.pack(1, b"\xff\xfe"), value)
    assert odd is not None and odd.path == "\udcff\udcfe"
    assert path_key("/a") == b"/a" + b"\0" * 106 and path_key("/" * 108) == b""


def test_the_programs_assemble() -> None:
    fds = kernel.EngineFds(3, 4, 5, 6, 7)
    ctx = kernel.KernCtx(cast_kfunc=100, uaddr=8, uaddrlen=32)
    for datagram in (False, True):
        code = kernel.unix_program(fds, ctx, datagram)
        assert len(code) % 8 == 0 and len(code) // 8 < 200


def _node(pid: int, build: Build | None, exe: str = "/ws/target/debug/build/evil-1/x"
          ) -> Node:
    n = Node(pid=pid, parent=None, info=ExecInfo(exe=exe), role=Role.BUILD_SCRIPT,
             crate=Crate("evil", "1.0.0"))
    n.build = build
    return n


def test_build_of_a_hit() -> None:
    registry = BuildRegistry(31000, 4)
    root = _node(10, None)
    build = registry.start(root, ts_ns=0, wall=0.0, via="cargo")
    root.build = build
    nodes = {10: root}
    hit = Hit(11, "/s", 0, programs.member_value(10, programs.ROLE_CRATE, pending=True),
              None, False, False)
    assert build_of(hit, None, registry.by_queue, nodes.get) is build
    named = Hit(11, "/s", 0, programs.member_value(build.queue), None, False, False)
    assert build_of(named, None, registry.by_queue, nodes.get) is build
    assert build_of(named, _node(12, None), lambda q: None, nodes.get) is None


class FakeOwner:
    engine_error = None

    def __init__(self) -> None:
        self.engine_fds = object()
        self.paths: dict[str, int] = {}
        self.refuse: list[bool] = []
        self.hits: list[Hit] = []

    def set_engine_paths(self, paths: dict[str, int]) -> None:
        self.paths = paths

    def set_engine_refuse(self, refuse: bool) -> None:
        self.refuse.append(refuse)

    def take_engine_hits(self) -> list[Hit]:
        out, self.hits = self.hits, []
        return out


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        yield path


def test_the_watch(listener: Path, tmp_path: Path) -> None:
    owner = FakeOwner()
    registry = BuildRegistry(31000, 4)
    node = _node(20, None)
    node.build = registry.start(node, ts_ns=0, wall=0.0, via="cargo")
    node.build.cgroup = "b"
    alerts: list[Alert] = []
    killed: list[str] = []
    state = {"mode": "audit", "policy": parse_policy("version: 1\ncontainer_engine: kill-build\n")}
    watch = EngineWatch(owner=lambda: owner, sockets=(str(tmp_path / "*.sock"),),  # type: ignore[arg-type, return-value]
                        node_of={20: node}.get, by_queue=registry.by_queue, emit=alerts.append,
                        policy=lambda: state["policy"], mode=lambda: str(state["mode"]),  # type: ignore[arg-type, return-value]
                        kill=killed.append, wall=lambda: 0.0, clock=lambda: 0.0)
    watch.tick()
    assert owner.paths == {str(listener): 0} and owner.refuse == [False]
    owner.hits = [Hit(20, str(listener), 1, 0, 0, False, False),
                  Hit(20, "/dev/log", 1, 0, None, False, False),
                  Hit(20, str(listener), 2, 0, 0, False, False)]  # the same again: one alert
    watch.tick()
    assert [a.kind for a in alerts] == ["container_engine"] and killed == []
    assert alerts[0].evidence["engine"] == "docker" and alerts[0].blocked is False
    link = tmp_path / "link"
    link.symlink_to(listener)
    state["mode"] = "enforce"
    owner.hits = [Hit(20, str(link), 3, 0, None, False, False)]
    watch.tick()
    assert owner.refuse == [False, True] and killed == ["b"]
    assert alerts[-1].evidence["socket"] == str(listener) and alerts[-1].blocked is True
    assert node.build.killed_by == "container_engine"
    docker = tmp_path / "bin" / "docker"
    docker.parent.mkdir()
    docker.write_text("")
    cli = _node(21, node.build, exe=str(docker))
    watch._node_of = {21: cli}.get
    watch.on_exec(21)
    assert alerts[-1].evidence["via"] == "exec" and alerts[-1].evidence["cli"] == "docker"


def test_sockets_found_once_and_resolved_as_the_process(listener: Path, tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    found = es.find_sockets((str(listener), str(tmp_path / "*"), str(tmp_path / "none")))
    assert [s.path for s in found] == [str(listener)]
    ident = found[0].identity
    assert es.resolve_as(os.getpid(), str(listener)) == ident
    assert es.resolve_as(os.getpid(), os.path.relpath(listener)) == ident
    assert es.resolve_as(2 ** 22 + 1, str(listener)) == ident  # gone: our root
    assert es.resolve_as(os.getpid(), str(tmp_path / "plain")) is None
    assert es.resolve_as(os.getpid(), "") is None
    assert es.resolve_as(os.getpid(), f"/proc/{os.getpid()}/root{listener}") == ident


def test_without_the_kernel_hooks_only_clis_are_seen(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    registry = BuildRegistry(31000, 4)
    docker = tmp_path / "docker"
    docker.write_text("")
    node = _node(30, None, exe=str(docker))
    node.build = registry.start(node, ts_ns=0, wall=0.0, via="cargo")
    alerts: list[Alert] = []
    policy = parse_policy("version: 1\n")
    watch = EngineWatch(owner=lambda: None, sockets=(), node_of={30: node}.get,
                        by_queue=registry.by_queue, emit=alerts.append, policy=lambda: policy,
                        mode=lambda: "enforce", kill=lambda rel: None, wall=lambda: 0.0,
                        clock=lambda: 0.0)
    watch.tick()
    watch.tick()
    assert [r.message.count("not watched in the kernel") for r in caplog.records] == [1]
    watch.on_exec(30)
    watch.on_exec(30)  # once per process and CLI
    assert [(a.evidence["cli"], a.blocked) for a in alerts] == [("docker", False)]


def test_requests_are_handed_on_for_the_containers_they_may_start(tmp_path: Path) -> None:
    """Every engine hit of a build and every CLI exec is a request (engine_launch.py), with
    the kernel's time of the connect."""
    owner = FakeOwner()
    registry = BuildRegistry(31000, 4)
    docker = tmp_path / "docker"
    docker.write_text("")
    node = _node(40, None, exe=str(docker))
    node.build = registry.start(node, ts_ns=0, wall=0.0, via="cargo")
    sock = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(sock))
        srv.listen(1)
        seen: list[tuple[str, int, int, str]] = []
        watch = EngineWatch(owner=lambda: owner, sockets=(str(sock),),  # type: ignore[arg-type, return-value]
                            node_of={40: node}.get, by_queue=registry.by_queue,
                            emit=lambda _a: None, policy=lambda: parse_policy("version: 1\n"),
                            mode=lambda: "audit", kill=lambda _r: None, wall=lambda: 0.0,
                            clock=lambda: 0.0, on_request=lambda b, n, t, e: seen.append(
                                (b.id, n.pid if n else 0, t, e)))
        watch.tick()
        owner.hits = [Hit(40, str(sock), 123, 0, 0, False, False)]
        watch.take_hits()
        watch.on_exec(40)
    assert seen[0] == (node.build.id, 40, 123, "docker")
    assert seen[1][:2] == (node.build.id, 40) and seen[1][3] == "docker"
