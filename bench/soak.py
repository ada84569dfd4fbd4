"""Soak: many builds in a row, each making one connection; is the daemon's memory flat? (root)

    make soak            (or: .venv/bin/python bench/soak.py [--builds N] [--warmup N])

Each build is a forked child of this process that asks the real daemon to make it a build
(the ``exec`` control request, as ``egress-monitor exec`` does), connects once to a test host
in a network namespace, and exits. Every ``--every`` builds the daemon's RSS, open fds and
process-tree size are sampled; the figure that matters is the RSS slope per 1,000 builds after
the warm-up (least squares over the samples; goal <= 0.1 MB), printed with the time per build.
Exits 1 when the slope is over the goal or a build was not recorded.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egress_monitor import control
from tests.kernel.netlab import DaemonHandle, TestHost, leftover_state, wait_until

HERE = Path(__file__).resolve().parent
GOAL_MB_PER_1000 = 0.1


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def one_build(runtime_dir: str, addr: str) -> int:
    """Fork a child that becomes a build and connects once; returns its exit status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            answer = control.call({"op": "exec"}, runtime_dir)
            if answer.get("ok"):
                with socket.create_connection((addr, 9000), timeout=10):
                    code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (builds, MB) points, in MB per 1,000 builds."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return 1000 * sxy / sxx if sxx else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--builds", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--every", type=int, default=250)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("soak: needs root", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="egress-soak-"))
    host = TestHost("soak", 62, tmp)
    peer = subprocess.Popen(["ip", "netns", "exec", host.ns, sys.executable,
                             str(HERE / "peer.py"), host.v4], stdout=subprocess.PIPE, text=True)
    daemon = DaemonHandle(tmp)
    failed = 0
    samples: list[tuple[int, float, int, float]] = []
    try:
        assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
        daemon.start()
        assert daemon.proc is not None
        dpid = daemon.proc.pid
        t0 = time.monotonic()
        for i in range(1, args.builds + 1):
            failed += one_build(str(daemon.runtime_dir), host.v4) != 0
            if i % args.every == 0:
                wait_until("the builds to end", lambda: daemon.metric(
                    "egress_monitor_builds_active") == 0, timeout=60)
                fds = len(os.listdir(f"/proc/{dpid}/fd"))
                mb = rss_kb(dpid) / 1024
                per_build_ms = (time.monotonic() - t0) * 1000 / i
                samples.append((i, mb, fds, per_build_ms))
                print(f"builds {i:6d}  rss {mb:7.2f} MB  fds {fds:4d}  "
                      f"tracked {daemon.metric('egress_monitor_tracked_processes'):6.0f}  "
                      f"{per_build_ms:6.1f} ms/build", flush=True)
        connections = daemon.metric("egress_monitor_connections_total", role="other",
                                    decision="allow", protocol="tcp")
    finally:
        status = daemon.stop()
        peer.kill()
        peer.wait()
        host.close()
    after = [(n, mb) for n, mb, _fds, _ms in samples if n > args.warmup]
    rate = slope(after) if len(after) >= 2 else float("nan")
    print(f"\n{args.builds} builds, {failed} failed, {connections:.0f} connections recorded; "
          f"daemon exit {status}")
    print(f"RSS slope after {args.warmup} warm-up builds: {rate:+.3f} MB per 1,000 builds "
          f"(goal <= {GOAL_MB_PER_1000}); fds {samples[0][2]} -> {samples[-1][2]}; "
          f"{samples[-1][3]:.1f} ms per build")
    left = leftover_state()
    # >=: a build elsewhere on the machine during the run is recorded too (it is a build).
    ok = (status == 0 and not failed and connections >= args.builds and not left
          and rate <= GOAL_MB_PER_1000)
    if left:
        print(f"left behind: {left}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
