"""What the kernel programs cost (root): fork, exec, socket creation, established throughput.

    flock /tmp/kernel.lock .venv/bin/python bench/bpf_bench.py [--quick]

Each figure is measured in the same run in three states, interleaved round by round so drift
hits all alike: ``off`` (no programs loaded), ``outside`` (programs loaded, this process not a
build member: what every other process on the host pays) and ``member`` (this process made a
member through the map, as adoption does; for throughput, a member socket whose flow has a
verdict, so every packet does the backstop's lookup). Throughput goes over a veth pair into a
network namespace (198.51.100.0/30) to a sink that discards. Prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egress_monitor.bpf import syscalls
from egress_monitor.bpf.marks import MarkLayout
from egress_monitor.bpf.owner import BpfOwner
from egress_monitor.bpf.programs import ROLE_CARGO, flow_key, member_value
from egress_monitor.enforce.cgroups import Cgroups
from tests.kernel.netlab import TestHost

SINK = """import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((HOST, 9000)); s.listen(8); print("ready", flush=True)
buf = bytearray(1 << 20)
while True:
    c, _ = s.accept()
    while c.recv_into(buf):
        pass
    c.close()
"""


def per_op_us(op: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        op()
    return (time.perf_counter() - start) / n * 1e6


def fork_once() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def exec_once() -> None:
    subprocess.run(["/bin/true"], check=True)


def socket_once() -> None:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()


def unix_once(srv: socket.socket, path: str) -> None:
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    srv.accept()[0].close()
    c.close()


def stream_gbit(owner: BpfOwner | None, member: bool, host: TestHost, size: int) -> float:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host.local_v4, 0))
    if owner is not None and member:
        owner.allow_flow(flow_key(4, 6, socket.inet_aton(host.local_v4),
                                  socket.inet_aton(host.v4), s.getsockname()[1], 9000))
    chunk = b"x" * (1 << 20)
    s.connect((host.v4, 9000))
    start = time.perf_counter()
    for _ in range(size >> 20):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # the sink closes once it has read everything
    elapsed = time.perf_counter() - start
    s.close()
    return size * 8 / elapsed / 1e9


@contextlib.contextmanager
def timed(owner: BpfOwner | None, name: str, row: dict[str, list[float]], per: str,
          n: int, label: str = "") -> Iterator[None]:
    """The kernel's own timing of program ``name`` over the block (run stats are on): its
    mean run and its runs per ``per`` go into ``row`` (as ``name label``); none without an
    owner."""
    if owner is None or name not in owner.prog_ids:  # off, or an optional one not loaded
        yield
        return
    prog = syscalls.prog_fd_by_id(owner.prog_ids[name])
    try:
        before = syscalls.prog_run_stats(prog)
        yield
        spent, runs, missed = (a - b for a, b in zip(syscalls.prog_run_stats(prog), before,
                                                     strict=True))
    finally:
        os.close(prog)
    row.setdefault(f"{name}{label} mean run (ns)", []).append(spent / max(runs, 1))
    row.setdefault(f"{name}{label} runs per {per}", []).append(runs / n)
    assert missed == 0, f"{name} missed {missed} runs (recursion)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds = 2 if args.quick else 6
    n_fork, n_exec, n_sock = (300, 50, 5000) if args.quick else (2000, 300, 50000)
    size = (64 if args.quick else 512) << 20
    tmp = Path(tempfile.mkdtemp(prefix="bpf-bench-"))
    host = TestHost("bpfb", 59, tmp)
    sink = subprocess.Popen(["ip", "netns", "exec", host.ns, sys.executable, "-c",
                             f"HOST = {host.v4!r}\n" + SINK], stdout=subprocess.PIPE, text=True)
    results: dict[str, dict[str, list[float]]] = {}
    unix_path = os.path.join(tmp, "bench.sock")
    unix_srv = socket.socket(socket.AF_UNIX)
    unix_srv.bind(unix_path)
    unix_srv.listen(64)
    run_stats = syscalls.enable_run_stats()
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        for _ in range(rounds):
            for state in ("off", "outside", "member"):
                owner = None
                if state != "off":
                    owner = BpfOwner.open(MarkLayout(), Cgroups.discover().mount)
                try:
                    if owner is not None and state == "member":
                        owner.set_member(os.getpid(), 1)
                    row = results.setdefault(state, {})
                    row.setdefault("fork+exit+wait (us)", []).append(per_op_us(fork_once,
                                                                               n_fork))
                    with timed(owner, "em_exec", row, "exec of the loop", n_exec):
                        row.setdefault("fork+exec /bin/true (us)", []).append(
                            per_op_us(exec_once, n_exec))
                    if owner is not None and state == "member":
                        # As cargo's child: role cargo before, so a second (transition) record.
                        owner.set_member(os.getpid(), member_value(1, ROLE_CARGO))
                        with timed(owner, "em_exec", row, "exec of the loop", n_exec,
                                   " (cargo's child)"):
                            per_op_us(exec_once, n_exec)
                        owner.set_member(os.getpid(), 1)
                    row.setdefault("socket+close (us)", []).append(per_op_us(socket_once,
                                                                             n_sock))
                    with timed(owner, "em_unix_connect", row, "unix connect", n_sock // 10):
                        row.setdefault("unix connect+accept+close (us)", []).append(per_op_us(
                            lambda: unix_once(unix_srv, unix_path), n_sock // 10))
                    with timed(owner, "em_sockopt", row, "setsockopt of the loop", n_sock), \
                            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        row.setdefault("setsockopt SO_REUSEADDR (us)", []).append(
                            per_op_us(lambda: s.setsockopt(socket.SOL_SOCKET,
                                                           socket.SO_REUSEADDR, 1), n_sock))
                    with timed(owner, "em_backstop", row, "MiB streamed", size >> 20):
                        row.setdefault("TCP stream (Gbit/s)", []).append(
                            stream_gbit(owner, state == "member", host, size))
                    if owner is not None:
                        stats = owner.stats()
                        assert stats["backstop_dropped"] == 0, stats
                finally:
                    if owner is not None:
                        owner.close()
    finally:
        os.close(run_stats)
        unix_srv.close()
        sink.kill()
        sink.wait()
        host.close()
        shutil.rmtree(tmp, ignore_errors=True)
    figures = list(dict.fromkeys([*results["off"], *results["member"]]))
    print(f"{'figure (median of ' + str(rounds) + ' rounds)':40} {'off':>10} {'outside':>10} "
          f"{'member':>10}")
    for fig in figures:
        cells = [f"{statistics.median(results[s][fig]):10.3f}" if fig in results[s]
                 else f"{'-':>10}" for s in ("off", "outside", "member")]
        print(f"{fig:40} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
