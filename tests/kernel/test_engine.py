"""Laundering through a container engine, tried as a build would: a build script writing to
the engine's API socket (by its path, by a symlink to it) or running its CLI.

There is no container engine here: the engine is a Unix-socket HTTP listener in a temporary
directory, given to the daemon with ``--engine-socket``, that writes down every request it
receives. The toolchain cargo is a copy of this Python registered with ``--cargo`` and the
build script a copy where cargo puts build scripts (as in test_identity.py). Each test checks
what the listener received, not only what the daemon wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.netlab import DaemonHandle, copied_toolchain, running, wait_until

PYTHON = os.path.realpath(sys.executable)
ENV = {**os.environ, "PYTHONHOME": sys.base_prefix}

ENGINE = r"""
import json, os, socket, sys
path, log = sys.argv[1], sys.argv[2]
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(16)
open(log + ".ready", "w").close()
while True:
    conn, _ = srv.accept()
    with conn:
        conn.settimeout(5)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        with open(log, "a") as f:
            f.write(json.dumps({"request": data.decode(errors="replace")}) + "\n")
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
"""

# The build script: POST /containers/create to the engine at argv[1]; prints what happened.
CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
    s.sendall(b"POST /v1.43/containers/create HTTP/1.0\r\nHost: docker\r\n\r\n")
    print("reply", s.recv(64)[:12])
except OSError as e:
    print(type(e).__name__)
"""

# cargo: run the build script with the code and its argument, then go on for a while (a
# killed build does not get to say "finished").
CARGO = r"""
import subprocess, sys, time
out = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=30)
print("script:", out.stdout.strip(), out.stderr.strip()[-200:])
time.sleep(3)
print("finished")
"""


@dataclass
class Lab:
    cargo: Path
    build_script: Path
    socket: Path
    log: Path

    def requests(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    cargo, bs = copied_toolchain(tmp_path)
    sock = tmp_path / "engine" / "docker.sock"
    sock.parent.mkdir()
    log = tmp_path / "engine.jsonl"
    with running([PYTHON, "-c", ENGINE, str(sock), str(log)], env=ENV):
        wait_until("the stand-in engine", lambda: Path(str(log) + ".ready").exists())
        yield Lab(cargo, bs, sock, log)


def _start(daemon: DaemonHandle, lab: Lab, mode: str, action: str | None) -> None:
    policy = f"version: 1\nmode: {mode}\n"
    if action is not None:
        policy += f"container_engine: {action}\n"
    daemon.restart("--cargo", str(lab.cargo), "--engine-socket", str(lab.socket),
                   policy=policy)


def _build(lab: Lab, *script: str) -> subprocess.CompletedProcess[str]:
    """cargo runs the build script with ``script`` as its arguments."""
    return subprocess.run([str(lab.cargo), "-c", CARGO, str(lab.build_script), *script],
                          capture_output=True, text=True, timeout=60, env=ENV)


def _engine_alerts(daemon: DaemonHandle) -> list[dict[str, Any]]:
    return [e for e in daemon.events("alert") if e["kind"] == "container_engine"]


def _check_actor(alert: dict[str, Any], lab: Lab) -> None:
    assert alert["severity"] == "critical" and alert["rule"] == "container_engine", alert
    assert alert["role"] == "build-script", alert
    assert alert["crate"]["name"] == "evil", alert
    assert alert["process"]["exe"] == str(lab.build_script), alert
    assert alert["build"]["id"], alert


def test_a_build_script_writing_to_the_engine_is_an_alert(daemon: DaemonHandle,
                                                          lab: Lab) -> None:
    """Audit mode, the default policy: the request reaches the engine (nothing is refused),
    and the alert names build, crate, process and engine socket."""
    _start(daemon, lab, "audit", None)
    out = _build(lab, "-c", CLIENT, str(lab.socket))
    assert "reply" in out.stdout and "finished" in out.stdout, out
    alert = daemon.wait_event("the container_engine alert",
                              lambda e: e["type"] == "alert" and e["kind"] ==
                              "container_engine")
    _check_actor(alert, lab)
    assert alert["evidence"]["socket"] == str(lab.socket)
    assert alert["evidence"]["via"] == "connect" and alert["evidence"]["action"] == "alert"
    assert alert["blocked"] is False and alert["evidence"]["build_killed"] is False
    assert len(lab.requests()) == 1


def test_kill_build_refuses_in_the_kernel_and_ends_the_build(daemon: DaemonHandle,
                                                             lab: Lab) -> None:
    """Enforce mode, ``container_engine: kill-build``: the connect is refused by the kernel
    (the engine receives nothing) and the build is killed; a process that is no build's
    talks to the same engine untouched."""
    _start(daemon, lab, "enforce", "kill-build")
    out = _build(lab, "-c", CLIENT, str(lab.socket))
    assert "finished" not in out.stdout and out.returncode == -9, out
    alert = daemon.wait_event("the container_engine alert",
                              lambda e: e["type"] == "alert" and e["kind"] ==
                              "container_engine")
    _check_actor(alert, lab)
    assert alert["blocked"] is True and alert["evidence"]["refused"] is True
    assert alert["evidence"]["build_killed"] is True
    assert lab.requests() == [], "the engine received a refused build's request"
    outsider = subprocess.run([PYTHON, "-c", CLIENT, str(lab.socket)], capture_output=True,
                              text=True, timeout=30, env=ENV)
    assert "reply" in outsider.stdout, outsider
    assert len(lab.requests()) == 1
    assert len(_engine_alerts(daemon)) == 1


def test_a_symlink_to_the_engine_socket_is_still_the_engine(daemon: DaemonHandle, lab: Lab,
                                                            tmp_path: Path) -> None:
    """The build script connects through a symlink the kernel cannot match by path: the
    daemon resolves it as the build script would, to the engine socket's identity. Alert,
    and the build is killed (after the fact: the connect itself was not refused)."""
    _start(daemon, lab, "enforce", "kill-build")
    link = tmp_path / "innocent" / "api.sock"
    link.parent.mkdir()
    link.symlink_to(lab.socket)
    out = _build(lab, "-c", CLIENT, str(link))
    assert "finished" not in out.stdout and out.returncode == -9, out
    alert = daemon.wait_event("the container_engine alert",
                              lambda e: e["type"] == "alert" and e["kind"] ==
                              "container_engine")
    _check_actor(alert, lab)
    assert alert["evidence"]["socket"] == str(lab.socket)
    assert alert["evidence"]["path"] == str(link)
    assert alert["evidence"]["refused"] is False and alert["evidence"]["build_killed"] is True


def test_deny_refuses_the_connect_and_the_build_goes_on(daemon: DaemonHandle,
                                                        lab: Lab) -> None:
    _start(daemon, lab, "enforce", "deny")
    out = _build(lab, "-c", CLIENT, str(lab.socket))
    assert "PermissionError" in out.stdout and "finished" in out.stdout, out
    alert = daemon.wait_event("the container_engine alert",
                              lambda e: e["type"] == "alert" and e["kind"] ==
                              "container_engine")
    assert alert["blocked"] is True and alert["evidence"]["build_killed"] is False
    assert lab.requests() == []


def test_running_a_container_cli_is_an_alert_and_kill_build(daemon: DaemonHandle, lab: Lab,
                                                            tmp_path: Path) -> None:
    """The build script runs ``docker`` (here a copy of Python under that name, which then
    tries the engine): the exec alone raises the alert, and kill-build ends the build."""
    docker = tmp_path / "bin" / "docker"
    docker.parent.mkdir()
    shutil.copy2(PYTHON, docker)
    _start(daemon, lab, "enforce", "kill-build")
    runner = "import subprocess, sys; subprocess.run(sys.argv[1:])"
    out = _build(lab, "-c", runner, str(docker), "-c", "import time; time.sleep(3)")
    assert "finished" not in out.stdout and out.returncode == -9, out
    alert = daemon.wait_event("the container_engine alert",
                              lambda e: e["type"] == "alert" and e["kind"] ==
                              "container_engine")
    assert alert["evidence"]["via"] == "exec" and alert["evidence"]["cli"] == "docker"
    assert alert["crate"]["name"] == "evil" and alert["process"]["exe"] == str(docker)
    assert alert["evidence"]["build_killed"] is True
