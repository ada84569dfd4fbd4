"""The Unix socket hooks on the real kernel (``em_unix_connect``, ``em_unix_send``).

A child process (the plain interpreter, made a member by the test, or left a non-member)
connects or sends to Unix sockets the test listens on and prints what the kernel answered;
the test reads ``engine_hits`` back. The ``bpf`` fixture (test_bpf.py) proves everything is
detached and freed afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egress_monitor.bpf.engines import Hit
from egress_monitor.bpf.owner import BpfOwner
from egress_monitor.bpf.programs import ROLE_CRATE, member_value
from tests.kernel import test_bpf
from tests.kernel.test_bpf import PYTHON

bpf = test_bpf.bpf  # the fixture, with its teardown checks

CLIENT = r"""
import json, os, socket, sys
print(json.dumps({"pid": os.getpid()}), flush=True)
for line in sys.stdin:
    op = json.loads(line)
    kind = socket.SOCK_STREAM if op["kind"] == "stream" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_UNIX, kind)
    if op.get("cwd"):
        os.chdir(op["cwd"])
    try:
        if op["op"] == "connect":
            s.connect(op["path"])
        else:
            s.sendto(b"x", op["path"])
        print(json.dumps({"ok": True}), flush=True)
    except OSError as e:
        print(json.dumps({"error": e.errno}), flush=True)
    finally:
        s.close()
"""


class Client:
    """A process that connects where it is told, a member or not."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([PYTHON, "-c", CLIENT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.pid = json.loads(self.proc.stdout.readline())["pid"]

    def do(self, **op: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(op) + "\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return result

    def close(self) -> None:
        self.proc.communicate("", timeout=10)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A listening stream socket and a bound datagram socket."""
    stream, dgram = tmp_path / "engine.sock", tmp_path / "engine.dgram"
    with socket.socket(socket.AF_UNIX) as s, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as d:
        s.bind(str(stream))
        s.listen(16)
        d.bind(str(dgram))
        yield stream, dgram


def _hits(bpf: BpfOwner, pid: int) -> dict[str, Hit]:
    return {h.path: h for h in bpf.take_engine_hits() if h.tgid == pid}


def test_a_members_connect_to_an_engine_path_is_refused_and_recorded(
        bpf: BpfOwner, engine: tuple[Path, Path], tmp_path: Path) -> None:
    assert bpf.engine_fds is not None, bpf.engine_error
    stream, dgram = engine
    (tmp_path / "link").symlink_to(stream)
    bpf.set_engine_paths({str(stream): 0, str(dgram): 1})
    bpf.set_engine_refuse(True)
    member, outsider = Client(), Client()
    try:
        value = member_value(7, ROLE_CRATE)
        bpf.set_member(member.pid, value)
        assert member.do(op="connect", kind="stream", path=str(stream)) == {"error": 1}
        assert member.do(op="sendto", kind="dgram", path=str(dgram)) == {"error": 1}
        assert member.do(op="connect", kind="dgram", path=str(dgram)) == {"error": 1}
        # Paths the kernel cannot match by name pass, and are recorded as given.
        assert member.do(op="connect", kind="stream", path=str(tmp_path / "link")) == \
            {"ok": True}
        assert member.do(op="connect", kind="stream", path="engine.sock",
                         cwd=str(tmp_path)) == {"ok": True}
        assert member.do(op="connect", kind="stream", path="\0no-such-abstract") == \
            {"error": 111}  # ECONNREFUSED: the kernel looked it up, so we did not refuse
        hits = _hits(bpf, member.pid)
        assert hits[str(stream)] == Hit(member.pid, str(stream), hits[str(stream)].ktime_ns,
                                        value, 0, True, False)
        assert hits[str(dgram)].engine == 1 and hits[str(dgram)].refused
        assert hits[str(tmp_path / "link")].engine is None
        assert not hits[str(tmp_path / "link")].refused
        assert hits["engine.sock"].engine is None
        assert hits[""].engine is None  # abstract: no path
        # A process of no build is never refused, nor recorded.
        assert outsider.do(op="connect", kind="stream", path=str(stream)) == {"ok": True}
        assert outsider.do(op="sendto", kind="dgram", path=str(dgram)) == {"ok": True}
        assert _hits(bpf, outsider.pid) == {}
        # With refusing off, the member's connect goes through and is still recorded.
        bpf.set_engine_refuse(False)
        assert member.do(op="connect", kind="stream", path=str(stream)) == {"ok": True}
        again = _hits(bpf, member.pid)[str(stream)]
        assert again.engine == 0 and not again.refused
        stats = bpf.stats()
        assert stats["engine_refused"] >= 3 and stats["engine_seen"] >= 4
    finally:
        member.close()
        outsider.close()
    assert os.path.exists(stream)
