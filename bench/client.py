"""The benchmark's client; run the same way inside and outside a build.

    client.py connect ADDR N     N connects to ADDR:9000; prints JSON latencies in seconds
    client.py send ADDR BYTES    BYTES to ADDR:9001; prints JSON {"seconds": s, "bytes": n}
    client.py spawn RATE SECONDS posix_spawn /bin/true at RATE per second; prints JSON counts
"""

from __future__ import annotations

import json
import os
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


def send(addr: str, total: int) -> None:
    block = b"\0" * (1 << 20)
    s = socket.create_connection((addr, 9001), timeout=30)
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        s.sendall(block)
        sent += len(block)
    s.shutdown(socket.SHUT_WR)
    acked = int(s.recv(64))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "bytes": acked}))


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


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "connect":
        connect(sys.argv[2], int(sys.argv[3]))
    elif mode == "send":
        send(sys.argv[2], int(sys.argv[3]))
    else:
        spawn(float(sys.argv[2]), float(sys.argv[3]))
