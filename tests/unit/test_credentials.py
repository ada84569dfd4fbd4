"""Credential reads without a kernel: which opens count, and the answers to every event."""

from __future__ import annotations

import struct
from pathlib import Path

from egress_monitor.builds import BuildRegistry
from egress_monitor.credentials import CredentialWatch, credential_of, home_of, judge
from egress_monitor.events import ExecInfo
from egress_monitor.policy.loader import parse_policy
from egress_monitor.process_tree import Node
from egress_monitor.roles import Crate, Role
from egress_monitor.sources.fanotify import OpenEvent, decode_events

POLICY = parse_policy("version: 1\nmode: enforce\n")
PATHS = POLICY.credential_paths


def test_which_paths_are_credentials() -> None:
    home = "/home/ci"
    assert credential_of("/home/ci/.ssh/id_rsa", home, PATHS) == ".ssh/"
    assert credential_of("/home/ci/.config/gcloud/a/b.json", home, PATHS) == ".config/gcloud/"
    assert credential_of("/home/ci/.kube/config", home, PATHS) == ".kube/config"
    assert credential_of("/home/ci/.kube/cache/x", home, PATHS) is None
    assert credential_of("/home/ci/.sshx/key", home, PATHS) is None
    assert credential_of("/home/other/.ssh/id_rsa", home, PATHS) is None
    assert credential_of("/home/ci/.cargo/credentials.toml", home, PATHS) == \
        ".cargo/credentials.toml"
    assert home_of(b"A=1\0HOME=/root\0") == "/root" and home_of(b"HOME=rel\0") is None
    assert home_of(b"PATH=/bin") is None


def node(role: Role, crate: str | None = "evil-dep") -> Node:
    n = Node(pid=7, parent=None, info=ExecInfo(exe="/x"), role=role,
             crate=Crate(crate, "1.0.0") if crate else None)
    n.build = BuildRegistry(31000, 2).start(n, ts_ns=0, wall=0.0, via="cargo")
    return n


def test_build_code_only_and_excepted_crates_are_left_alone() -> None:
    key = "/h/.aws/credentials"
    assert judge(node(Role.BUILD_SCRIPT), key, "/h", POLICY) == ".aws/"
    assert judge(node(Role.RUSTC), key, "/h", POLICY) == ".aws/"
    assert judge(node(Role.CRATE_BINARY), key, "/h", POLICY) == ".aws/"
    assert judge(node(Role.CARGO), "/h/.cargo/credentials.toml", "/h", POLICY) is None
    assert judge(node(Role.OTHER), key, "/h", POLICY) is None
    assert judge(None, key, "/h", POLICY) is None
    excepted = parse_policy("version: 1\ncredential_reads:\n  except_crates: [evil-dep]\n"
                            "  paths: [.npmrc]\n")
    assert judge(node(Role.BUILD_SCRIPT), key, "/h", excepted) is None
    assert judge(node(Role.BUILD_SCRIPT, "other"), "/h/.npmrc", "/h", excepted) == ".npmrc"
    assert judge(node(Role.BUILD_SCRIPT, "other"), key, "/h", excepted) is None


class FakeSource:
    def __init__(self, events: list[OpenEvent], paths: dict[int, str]) -> None:
        self.events, self.paths = events, paths
        self.answers: list[tuple[int, bool]] = []
        self.marks: list[tuple[str, bool]] = []

    def read(self) -> list[OpenEvent]:
        out, self.events = self.events, []
        return out

    def respond(self, event: OpenEvent, allow: bool) -> None:
        self.answers.append((event.fd, allow))

    def mark(self, path: str, directory: bool) -> None:
        self.marks.append((path, directory))

    def unmark(self, path: str, directory: bool) -> None:
        self.marks.remove((path, directory))


def test_every_event_is_answered_and_enforce_refuses_build_code(tmp_path: Path) -> None:
    home = tmp_path.resolve()
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_rsa").write_text("k")
    (home / ".netrc").write_text("n")
    script = node(Role.BUILD_SCRIPT)
    assert script.build is not None
    nodes = {7: script}
    out: list[dict[str, object]] = []
    fake = FakeSource([OpenEvent(7, 10, 0), OpenEvent(8, 11, 0), OpenEvent(7, 12, 0)],
                      {10: str(home / ".ssh" / "id_rsa"), 11: str(home / ".netrc"),
                       12: str(home / "notes")})
    watch = CredentialWatch(source=fake, node_of=nodes.get,  # type: ignore[arg-type]
                            emit=lambda alert: out.append(alert.record()), policy=lambda: POLICY,
                            enforce=lambda: True,
                            wall=lambda: 0.0, path_of=lambda e: fake.paths.get(e.fd))
    watch.build_started(script.build, f"HOME={home}".encode())
    assert sorted(fake.marks) == [(str(home / ".netrc"), False), (str(home / ".ssh"), True)]
    watch.handle()
    assert fake.answers == [(10, False), (11, True), (12, True)]  # pid 8 is no build's
    assert [(a["kind"], a["blocked"]) for a in out] == [("credential_read", True)]
    watch.build_ended(script.build)
    assert fake.marks == []


def test_decode_is_total() -> None:
    record = struct.pack("=IBBHQii", 24, 3, 0, 24, 0x10000, 9, 1234)
    assert decode_events(record * 2) == [OpenEvent(1234, 9, 0x10000)] * 2
    assert decode_events(record[:20]) == []
    assert decode_events(struct.pack("=IBBHQii", 10, 3, 0, 24, 0, 1, 1)) == []
    assert decode_events(struct.pack("=IBBHQii", 24, 2, 0, 24, 0, 1, 1)) == []
    assert decode_events(record + b"\x00" * 7) == [OpenEvent(1234, 9, 0x10000)]
