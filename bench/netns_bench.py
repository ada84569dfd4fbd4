"""What a namespace's gate adds to a new connection, against the same gate on the host (root).

    flock /tmp/kernel.lock .venv/bin/python bench/netns_bench.py [--quick]

Two test hosts: one linked to the host's namespace, one linked only to a namespace of its
own (the "container"). In each namespace the daemon's ruleset gates one cgroup (``mon``)
and leaves another (``plain``) alone; an accept-all consumer (the floor of issue 10's bench:
no judgement, no verdict key) answers the queue, on the host through ``QueueSocket``, in the
namespace through ``NetnsGate``. A client in each cgroup and namespace times sequential TCP
connects (SYN to established). Rounds are interleaved so drift hits all alike. Prints one
table: p50 and p99 per case and the added p50 (gated minus plain) per namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egress_monitor.enforce.cgroups import Cgroups
from egress_monitor.enforce.firewall import Firewall
from egress_monitor.enforce.netns import NetnsGate
from egress_monitor.enforce.rules import BuildRule
from egress_monitor.sources.nfqueue import NF_ACCEPT, QueueSocket
from tests.kernel.netlab import TestHost, sh

QUEUE = 7
# Accepts and closes at once with a deep backlog (the recorder's HTTP server, backlog 5, drops
# SYNs under a stream of connects: 1 s retransmissions in every case).
SINK = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000)); s.listen(1024); print("ready", flush=True)
while True:
    s.accept()[0].close()
"""
CLIENT = """
import json, socket, sys, time
host, n = sys.argv[1], int(sys.argv[2])
out = []
for _ in range(n):
    t = time.perf_counter()
    s = socket.create_connection((host, 9000), timeout=5)
    out.append((time.perf_counter() - t) * 1e6)
    s.close()
print(json.dumps(out))
"""


def consume(queue: QueueSocket, stop: threading.Event) -> None:
    while not stop.is_set():
        if select.select([queue], [], [], 0.05)[0]:
            for p in queue.read():
                queue.verdict(p.queue, p.packet_id, NF_ACCEPT)


def client(cgroup_dir: str, ns: str | None, host: str, n: int) -> list[float]:
    argv = ["sh", "-c", f'echo $$ > {cgroup_dir}/cgroup.procs && exec "$@"', "sh"]
    argv += (["ip", "netns", "exec", ns] if ns else []) + [sys.executable, "-c", CLIENT, host,
                                                            str(n)]
    out: list[float] = json.loads(sh(*argv).stdout)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds, n = (3, 50) if args.quick else (6, 100)
    cgroups = Cgroups.discover()
    tag = f"{os.getpid() % 10000}"
    ns = f"emt-nsbench-{tag}"
    mon, plain = (cgroups.create("/", f"emt-bench-{k}-{tag}") for k in ("mon", "plain"))
    stop = threading.Event()
    threads: list[threading.Thread] = []
    firewall = Firewall()
    gate: NetnsGate | None = None
    queue: QueueSocket | None = None
    sinks: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory() as tmp, \
            TestHost(f"{tag}-bh", 56, Path(tmp)) as on_host, \
            TestHost(f"{tag}-bn", 57, Path(tmp)) as in_ns:
        try:
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", in_ns.host_if, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{in_ns.local_v4}/30", "dev", in_ns.host_if)
            sh("ip", "-n", ns, "link", "set", in_ns.host_if, "up")
            for host in (on_host, in_ns):
                sink = subprocess.Popen(["ip", "netns", "exec", host.ns, sys.executable, "-c",
                                         SINK, host.v4], stdout=subprocess.PIPE, text=True)
                sinks.append(sink)
                assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
            queue = QueueSocket()
            queue.bind_queue(QUEUE)
            firewall.install([BuildRule(mon, QUEUE)])
            gate = NetnsGate.open(f"/run/netns/{ns}", [BuildRule(mon, QUEUE)])
            for q in (queue, gate.queue):
                assert q is not None
                threads.append(threading.Thread(target=consume, args=(q, stop), daemon=True))
                threads[-1].start()
            cases = {("host", "plain"): (plain, None, on_host.v4),
                     ("host", "gated"): (mon, None, on_host.v4),
                     ("netns", "plain"): (plain, ns, in_ns.v4),
                     ("netns", "gated"): (mon, ns, in_ns.v4)}
            got: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
            for _ in range(rounds):
                for key, (cg, where, addr) in cases.items():
                    got[key] += client(cgroups.mount + cg, where, addr, n)
        finally:
            stop.set()
            for sink in sinks:
                sink.kill()
                sink.wait()
            for t in threads:
                t.join(timeout=5)
            if gate is not None:
                gate.close()
            firewall.remove()
            if queue is not None:
                queue.close()
            sh("ip", "netns", "del", ns, check=False)
            for cg in (mon, plain):
                cgroups.remove(cg)
    print(f"sequential TCP connects, {rounds} rounds x {n} per case (microseconds)")
    print(f"{'case':<16}{'p50':>10}{'p99':>10}")
    p50 = {}
    for key, values in got.items():
        values.sort()
        p50[key] = statistics.median(values)
        print(f"{key[0] + ' ' + key[1]:<16}{p50[key]:>10.1f}"
              f"{values[int(len(values) * 0.99) - 1]:>10.1f}")
    for where in ("host", "netns"):
        print(f"added p50 {where:<6}{p50[(where, 'gated')] - p50[(where, 'plain')]:>10.1f}")


if __name__ == "__main__":
    main()
