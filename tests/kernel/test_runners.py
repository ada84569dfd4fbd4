"""Build-script runners (Bazel's cargo_build_script_runner, Buck2's buildscript_run), tried as
a build would.

The runner here is a copy of this Python registered with ``--build-script-runner`` (the shape
of Buck2's: a dedicated interpreter; the kernel knows it by identity, so only that copy is a
runner). The build system starts it outside any build with the crate's ``CARGO_PKG_*``, and it
runs a "build script" named as Bazel names them. Every connecting process is a copy of Python
of its own, so each event says which one it was. Enforce mode, the shipped default policy and
a drop-in that lets crate ``victim``'s build script reach the test host: only names chosen by
crate code could reach that exception, and none does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.kernel.netlab import REPO, DaemonHandle, TestHost, copied_toolchain, wait_until

PYTHON = os.path.realpath(sys.executable)
EXCEPTION = """\
version: 1
groups:
  lab: {{cidrs: [{net}]}}
rules:
  - {{id: victim-exception, role: build-script, crate: victim, to: [lab], action: allow}}
"""
CONNECT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], 8080), timeout=3)
    s.sendall(b"GET /" + sys.argv[2].encode() + b" HTTP/1.0\\r\\n\\r\\n")
    s.recv(64)
except OSError as e:
    print(sys.argv[2], type(e).__name__)
"""
# The runner: run argv[1:] with the environment the build system gave it (as Bazel's does).
RUNNER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
# The build script: connect; name crate victim in its own environment and run a child that
# connects; run the runner itself (crate code gains nothing by it), whose child connects.
SCRIPT = """
import os, subprocess, sys
connect, host, child, runner, rerun = sys.argv[1:6]
sys.argv = [sys.argv[0], host, "script"]
exec(connect)
env = dict(os.environ, CARGO_PKG_NAME="victim", CARGO_PKG_VERSION="1.0.0")
subprocess.run([child, "-c", connect, host, "script-child"], env=env)
subprocess.run([runner, "-c", RUNNER, rerun, "-c", connect, host, "rerun"], env=env)
""".replace("RUNNER", repr(RUNNER))


def _copy(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(PYTHON, path)
    return str(path)


def _run(argv: list[str], **env: str) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONHOME": sys.base_prefix, **env})
    assert out.returncode == 0, out.stderr


def test_what_a_runner_runs_is_its_crates_build_script(daemon: DaemonHandle,
                                                       test_host: TestHost,
                                                       tmp_path: Path) -> None:
    """The runner, started outside any build with crate ring's CARGO_PKG_*, runs a script
    that connects: build-script of ring, on the runner's word (role_basis), refused. The
    script names crate victim in its own environment for a child, and runs the runner
    itself for another: both still ring's build script, refused. A build script under cargo
    running the runner stays its own crate's. A copy of the runner, started outside any
    build, is no runner: its child is not a build at all (its connection is not judged). A
    ``#!`` script whose interpreter is the runner is the runner (Buck2's shape). A
    configured runner that does not exist is named in a warning, and the daemon runs."""
    out = tmp_path / "bazel-out" / "bin"
    runner = _copy(out / "cargo" / "cargo_build_script_runner" / "runner")
    script = _copy(out / "external" / "ring" / "ring_bs_build_script_")
    child, rerun, under_cargo, copied_child = (
        _copy(tmp_path / "bin" / name) for name in ("child", "rerun", "under-cargo", "copied"))
    runner_copy = _copy(tmp_path / "elsewhere" / "runner")
    buck_script = _copy(tmp_path / "buck-out" / "zstd-sys" / "build_script_build")
    cargo, build_script = copied_toolchain(tmp_path)
    dropins = tmp_path / "policy.d"
    dropins.mkdir()
    (dropins / "50-victim.yaml").write_text(EXCEPTION.format(net=f"{test_host.v4}/32"))
    absent = tmp_path / "not-built-yet" / "runner"
    daemon.restart("--policy", str(REPO / "policies" / "default.yaml"), "--policy-dir",
                   str(dropins), "--mode", "enforce", "--build-script-runner", runner,
                   "--build-script-runner", str(absent), "--cargo", str(cargo))
    assert f"toolchain file: build-script runner {runner}" in daemon.log()
    assert f"build-script runner {absent}: no such file" in daemon.log()

    # A copy of the runner: nothing to the daemon (so the test host gets this one).
    _run([runner_copy, "-c", RUNNER, copied_child, "-c", CONNECT, test_host.v4, "copy"],
         CARGO_PKG_NAME="victim")
    # The build system runs the real one for ring.
    _run([runner, "-c", RUNNER, script, "-c", SCRIPT, CONNECT, test_host.v4, child, runner,
          rerun], CARGO_PKG_NAME="ring", CARGO_PKG_VERSION="0.17.8")
    # Buck2's shape: a `#!` script whose interpreter is the registered copy (the kernel's
    # identity of a script's exec is its interpreter's).
    buildscript_run = tmp_path / "buck-out" / "buildscript_run.py"
    buildscript_run.write_text(f"#!{runner}\n{RUNNER}\n")
    buildscript_run.chmod(0o755)
    _run([str(buildscript_run), buck_script, "-c", CONNECT, test_host.v4, "buck"],
         CARGO_PKG_NAME="zstd-sys", CARGO_PKG_VERSION="2.0.9")
    # cargo runs a build script of crate evil, which runs the runner naming victim.
    _run([str(cargo), "-c", RUNNER, str(build_script), "-c", RUNNER, runner, "-c", RUNNER,
          under_cargo, "-c", CONNECT, test_host.v4, "under-cargo"])

    exes = {script: "ring", child: "ring", rerun: "ring", buck_script: "zstd-sys",
            under_cargo: "evil"}

    def all_in() -> dict[str, dict[str, Any]] | None:
        found = {e["process"]["exe"]: e for e in daemon.events("connection")
                 if e["dst"]["ip"] == test_host.v4}
        return found if set(exes) <= set(found) else None
    events = wait_until("each connection's event", all_in, timeout=30)
    for exe, crate in exes.items():
        event = events[exe]
        assert (event["role"], event["crate"]["name"], event["decision"]) == \
            ("build-script", crate, "deny"), event
    assert events[script]["crate"]["version"] == "0.17.8"
    for exe in (script, buck_script):
        assert events[exe]["role_basis"] == f"build-script runner {runner} ran {exe} (crate " \
            "from the runner's environment)", events[exe]
    assert events[script]["build"]["id"] in [e["build"]["id"] for e in daemon.events("build_start")
                                             if e["via"] == "build-script-runner"]
    assert copied_child not in events, events[copied_child]
    assert [r.get("path") for r in test_host.requests()] == ["/copy"], test_host.requests()
