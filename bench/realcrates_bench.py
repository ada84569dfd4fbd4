"""No regression on real code: ~150 real crates built and tested under the enforcing daemon.

    make bench   (or: .venv/bin/python bench/realcrates_bench.py [--set small] [--lock FILE])

Writes the workspace of ``bench/realcrates.py`` (Debian's ``librust-*-dev`` sources as a
directory registry), then runs ``cargo build`` and ``cargo test`` twice from scratch, each with
a target directory of its own: once under a real daemon enforcing the shipped
``policies/default.yaml`` (the builds are found from cargo's exec, as on a CI runner), once
with no daemon. Prints the wall times side by side, the daemon's CPU seconds and peak RSS,
and checks the daemon's events: no alert, no denial, and every build script that ran (from
the filesystem) named in a ``build_end`` summary. Exits 1 on any problem.

``--lock FILE`` holds an flock on FILE during each half (the daemon's and the plain one),
for machines where kernel tests and daemons must take turns; each half stays under ~4 min.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import realcrates
from tests.kernel.netlab import DaemonHandle, leftover_state, wait_until

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def held(path: str | None) -> Iterator[None]:
    """An exclusive flock on ``path`` for the block (nothing when None)."""
    if path is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cpu(pid: int) -> tuple[float, float]:
    """(own, waited-for children's) CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tck, (int(fields[13]) + int(fields[14])) / tck


def hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def build_and_test(ws: Path, target: Path) -> tuple[float, float, list[str]]:
    """cargo build, then cargo test; their wall times and any failure text."""
    errors = []
    t_build, built = realcrates.cargo(ws, target, "build")
    if built.returncode:
        errors.append(f"cargo build failed:\n{built.stderr[-3000:]}")
    t_test, tested = realcrates.cargo(ws, target, "test")
    if tested.returncode or "test result: ok" not in tested.stdout:
        errors.append(f"cargo test failed:\n{tested.stderr[-3000:]}")
    return t_build, t_test, errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", choices=sorted(realcrates.SETS), default="full")
    ap.add_argument("--lock", metavar="FILE", help="flock FILE during each half")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("realcrates bench: needs root", file=sys.stderr)
        return 2
    missing = realcrates.missing_crates(args.set)
    if missing:
        print(f"realcrates bench: no Debian source for {missing} in {realcrates.REGISTRY}; "
              "`make bench` installs the Makefile's REALCRATES_APT", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="egress-realcrates-"))
    ws = realcrates.write_workspace(tmp / "ws", args.set)
    problems: list[str] = []

    # Under the daemon first: page-cache warmth then favours the unmonitored half, if anyone.
    with held(args.lock):
        daemon = DaemonHandle(tmp)
        daemon.start("--policy", str(REPO / "policies" / "default.yaml"), "--mode", "enforce")
        assert daemon.proc is not None
        pid = daemon.proc.pid
        try:
            own0, kids0 = cpu(pid)
            t0 = time.perf_counter()
            mb, mt, errors = build_and_test(ws, tmp / "target-monitored")
            problems += errors
            # Each cargo run is a build; its build_end comes once its last process is gone.
            with contextlib.suppress(AssertionError):  # too few is reported below
                wait_until("both build_end records", lambda: sum(
                    1 for e in daemon.events("build_end")
                    if (e.get("build") or {}).get("cwd") == str(ws)) >= 2, timeout=30)
            wall = time.perf_counter() - t0
            own1, kids1 = cpu(pid)
            peak = hwm_mb(pid)
        finally:
            status = daemon.stop()
        left = leftover_state()
    events = daemon.events()
    problems += realcrates.problems(events, ws, tmp / "target-monitored", builds=2)
    if status != 0:
        problems.append(f"daemon exited {status}:\n{daemon.log()[-2000:]}")
    if left:
        problems.append(f"leftover kernel state: {left}")

    with held(args.lock):
        pb, pt, errors = build_and_test(ws, tmp / "target-plain")
    problems += errors

    ran = realcrates.ran_build_scripts(tmp / "target-monitored")
    ends = [e for e in events if e["type"] == "build_end"
            and (e.get("build") or {}).get("cwd") == str(ws)]
    named = realcrates.reported_build_scripts(ends)
    print(f"\nreal crates ({args.set}), {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
          f"{realcrates.package_count(ws)} packages, {len(ran)} build scripts ran\n")
    rows = [
        ("cargo build", pb, mb),
        ("cargo test", pt, mt),
        ("build + test", pb + pt, mb + mt),
    ]
    print(f"{'wall time':<16} {'unmonitored':>12} {'monitored':>12} {'ratio':>7}")
    for name, plain, mon in rows:
        print(f"{name:<16} {plain:>11.1f}s {mon:>11.1f}s {mon / plain:>7.3f}")
    own, kids = own1 - own0, kids1 - kids0
    print(f"\ndaemon CPU during the monitored build + test: {own:.2f} s own + {kids:.2f} s "
          f"of its children (iptables-restore...) over {wall:.1f} s "
          f"({(own + kids) / wall * 100:.1f}% of one core)")
    print(f"daemon peak RSS (VmHWM): {peak:.1f} MB")
    alerts = sum(1 for e in events if e["type"] == "alert")
    denials = sum(1 for e in events if e.get("decision") == "deny")
    print(f"alerts {alerts}, denials {denials}, build scripts named by the daemon "
          f"{len({realcrates.norm(n) for n in ran} & named)} of {len(ran)}; "
          f"build_end records {len(ends)}")
    if problems:
        print("\nPROBLEMS:\n- " + "\n- ".join(problems))
    if not args.keep:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
