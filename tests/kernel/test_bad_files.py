"""Bad files against the real daemon: a broken policy on SIGHUP leaves the running policy in
force (one case per class of breakage), and a broken config does not stop ``failclosed``
(systemd's ExecStopPost) from refusing builds while the daemon is down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.kernel.netlab import DaemonHandle, TestHost, get_as_build, running, wait_until

# Enforce, and the lab host denied to other processes: a refused connection is sent to the
# sinkhole, which reads it and cuts it off, and the host receives nothing.
DENY_LAB = """\
version: 1
mode: enforce
groups:
  lab: {{cidrs: [{net}]}}
rules:
  - {{id: lab, role: other, to: [lab], action: deny}}
"""

# Each would let the connection through if it were applied (audit mode, or an allow rule);
# each must be rejected as a whole. The line the error must name comes with it.
BROKEN: dict[str, tuple[bytes, int]] = {
    "syntax error": (b"version: 1\nmode: audit\nrules: [ {id: x, action: allow\n", 4),
    "not UTF-8": (b"version: 1\nmode: audit\n# caf\xe9\n", 3),
    "alias bomb": (b"version: 1\nmode: audit\ngroups:\n  g0: &a0 {hosts: [a, a, a, a, a, a, a, "
                   b"a, a, a]}\n"
                   + b"".join(b"  g%d: &a%d [" % (d, d) + b", ".join([b"*a%d" % (d - 1)] * 10)
                              + b"]\n" for d in range(1, 6)), 8),
    "deep nesting": (b"version: 1\nmode: audit\nrules: " + b"[" * 200 + b"]" * 200 + b"\n", 3),
    "huge int": (b"version: 1\nmode: enforce\ngroups:\n  lab: {cidrs: [NET], ports: ["
                 + b"9" * 5000 + b"]}\nrules:\n  - {id: lab, role: other, to: [lab], "
                 b"action: allow}\n", 4),
    "unicode digit": ("version: 1\nmode: enforce\ngroups:\n  lab: {cidrs: [NET], ports: "
                      "['\u00b2']}\nrules:\n  - {id: lab, role: other, to: [lab], action: "
                      "allow}\n".encode(), 4),
    "bad key": (b"version: 1\nmode: audit\nmodes: enforce\n", 3),
}


def test_sighup_with_each_class_of_broken_policy_keeps_the_old_policy(
        daemon: DaemonHandle, test_host: TestHost) -> None:
    net = f"{test_host.v4}/32"
    path = daemon.restart(policy=DENY_LAB.format(net=net))
    old = daemon.events("daemon")[-1]["policy_digest"]
    assert get_as_build(daemon, test_host, "/before") == "cut-off"
    assert daemon.proc is not None
    for n, (case, (text, line)) in enumerate(BROKEN.items(), start=1):
        time.sleep(0.01)  # a distinct mtime for the write on coarse-clock filesystems
        path.write_bytes(text.replace(b"NET", net.encode()))
        os.kill(daemon.proc.pid, signal.SIGHUP)
        def rejected_reloads(n: int = n) -> bool:
            return daemon.metric("egress_monitor_policy_reloads_total",
                                 result="rejected") >= n
        wait_until(f"the rejected reload ({case})", rejected_reloads)
        assert daemon.proc.poll() is None, f"{case}: the daemon exited:\n{daemon.log()}"
        rejected = [e for e in daemon.events("daemon") if e["state"] == "reload_rejected"][-1]
        assert rejected["policy_digest"] == old, case
        assert rejected["errors"][0].startswith(f"{path}:{line}:"), (case, rejected["errors"])
        assert "Traceback" not in daemon.log(), case
        # The old policy still judges a real connection: refused, and nothing arrived.
        assert get_as_build(daemon, test_host, f"/{n}") == "cut-off", case
        assert test_host.requests() == [], case
    assert daemon.metric("egress_monitor_policy_reloads_total", result="ok") == 0


def test_failclosed_with_a_broken_config_still_refuses_builds(
        daemon: DaemonHandle, test_host: TestHost, tmp_path: Path) -> None:
    daemon.restart(policy=DENY_LAB.format(net=f"{test_host.v4}/32").replace("deny", "allow"))
    config = tmp_path / "config.yaml"
    config.write_bytes(b"version: 1\nfail_mode: open\ndns: {port: '\xb2'}\n")
    go, out = tmp_path / "go", tmp_path / "out"
    script = f"""
import os, socket, time
while not os.path.exists("{go}"):
    time.sleep(0.02)
t = time.monotonic()
try:
    s = socket.create_connection(("{test_host.v4}", 8080), timeout=10)
    s.sendall(b"GET /x HTTP/1.0\\r\\n\\r\\n")
    r = "connected"
except OSError as e:
    r = type(e).__name__
open("{out}", "w").write(f"{{r}} {{time.monotonic() - t:.3f}}\\n")
"""
    with running(daemon.exec_argv(sys.executable, "-c", script)) as build:
        daemon.wait_event("build_start", lambda e: e["type"] == "build_start")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        fc = subprocess.run([*daemon.exec_argv()[:3], "failclosed", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
        # Not UTF-8 (so fail_mode open is never read): refused with the defaults, and said.
        assert fc.returncode == 1, fc
        assert f"{config}:3:" in fc.stderr and "not UTF-8" in fc.stderr, fc.stderr
        assert "Traceback" not in fc.stderr
        assert "are refused until the daemon is back" in fc.stdout
        go.touch()
        line = wait_until("the attempt", lambda: out.exists() and out.read_text())
        kind, seconds = line.split()
        assert kind == "ConnectionRefusedError" and float(seconds) < 1.0, line
        assert test_host.requests() == []
        daemon.start()  # adopts the build; the fixture stops it cleanly and checks leftovers
        build.wait(timeout=30)
