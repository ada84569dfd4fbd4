"""The benchmark's client; run the same way inside and outside a build.

    client.py connect ADDR N     N connects to ADDR:9000; prints JSON latencies in seconds
    client.py request ADDR N     N requests to ADDR:9002 (connect, 16 bytes, the 2-byte answer);
                                 prints JSON round-trip times in seconds
    client.py send ADDR BYTES    BYTES to ADDR:9001; prints JSON {"seconds": s, "bytes": n,
                                 "steady_seconds", "steady_bytes", "cpu": after the first 1/8}
    client.py spawn RATE SECONDS posix_spawn /bin/true at RATE per second; prints JSON counts
    client.py burst ADDR PROCS ROUNDS  PROCS forked processes connect to ADDR:9000 at once,
                                 ROUNDS times (a barrier starts each round); prints JSON
                                 {"latencies": [PROCS * ROUNDS s], "spans": [ROUNDS s]}
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.synchronize
import os
import resource
import socket
import sys
import time


def connect(addr: str, n: int) -> None:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        s = socket.create_connection((addr, 9000), timeout=10)
        out.append(time.perf_counter() - t0)
        s.close()
    print(json.dumps(out))


def request(addr: str, n: int) -> None:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection((addr, 9002), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            s.recv(2)
        out.append(time.perf_counter() - t0)
    print(json.dumps(out))


def send(addr: str, total: int) -> None:
    """Send ``total`` bytes; the figures of the established flow (``steady_*``, ``cpu``: this
    process's user+system seconds, which include the kernel's sending path and, over veth,
    the receiving stack run in the sender's context) start after the first eighth, so that
    the connection's setup (its judgment, the first-data inspection) is not in them."""
    block = b"\0" * (1 << 20)
    s = socket.create_connection((addr, 9001), timeout=30)
    t0 = time.perf_counter()
    sent = 0
    warm = total // 8
    t1, cpu1 = t0, 0.0
    while sent < total:
        s.sendall(block)
        sent += len(block)
        if sent == warm or (sent > warm and t1 == t0):
            t1, cpu1, warm_bytes = time.perf_counter(), _cpu(), sent
    s.shutdown(socket.SHUT_WR)
    acked = int(s.recv(64))
    t2, cpu2 = time.perf_counter(), _cpu()
    print(json.dumps({"seconds": t2 - t0, "bytes": acked, "steady_seconds": t2 - t1,
                      "steady_bytes": acked - warm_bytes, "cpu": cpu2 - cpu1}))


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def spawn(rate: float, seconds: float) -> None:
    interval = 1.0 / rate
    start = time.perf_counter()
    spawned = 0
    pids: list[int] = []
    while (now := time.perf_counter()) - start < seconds:
        due = start + spawned * interval
        if now < due:
            time.sleep(due - now)
        pids.append(os.posix_spawn("/bin/true", ["true"], {}))
        spawned += 1
        if len(pids) > 64:
            for pid in pids:
                os.waitpid(pid, 0)
            pids.clear()
    for pid in pids:
        os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    print(json.dumps({"spawned": spawned, "seconds": elapsed}))


def _burst_child(addr: str, rounds: int, barrier: multiprocessing.synchronize.Barrier,
                 out: multiprocessing.connection.Connection) -> None:
    times = []
    for _ in range(rounds):
        barrier.wait()
        t0 = time.perf_counter()
        s = socket.create_connection((addr, 9000), timeout=10)
        times.append((t0, time.perf_counter()))
        s.close()
    out.send(times)


def burst(addr: str, procs: int, rounds: int) -> None:
    # Forked, not spawned: every connecting process is a child of this one (one build), and
    # is ready before the first round starts. perf_counter is CLOCK_MONOTONIC, the same clock
    # in every process, so a round's span is its last connect's end less its first start.
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(procs, timeout=60)
    pipes = [ctx.Pipe(duplex=False) for _ in range(procs)]
    children = [ctx.Process(target=_burst_child, args=(addr, rounds, barrier, w), daemon=True)
                for _r, w in pipes]
    for c in children:
        c.start()
    per_child = []
    for r, _w in pipes:
        if not r.poll(120):
            raise SystemExit("burst: a child sent nothing in 120 s")
        per_child.append(r.recv())
    for c in children:
        c.join()
        if c.exitcode != 0:
            raise SystemExit(f"burst: a child exited {c.exitcode}")
    latencies = [t1 - t0 for times in per_child for t0, t1 in times]
    spans = [max(t[i][1] for t in per_child) - min(t[i][0] for t in per_child)
             for i in range(rounds)]
    print(json.dumps({"latencies": latencies, "spans": spans}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "connect":
        connect(sys.argv[2], int(sys.argv[3]))
    elif mode == "request":
        request(sys.argv[2], int(sys.argv[3]))
    elif mode == "send":
        send(sys.argv[2], int(sys.argv[3]))
    elif mode == "burst":
        burst(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        spawn(float(sys.argv[2]), float(sys.argv[3]))
