"""Cost of secret-value matching on the first-data verdict path.

    python bench/secrets_bench.py [--rounds N]

For 0, 10 and 100 secret variables in a build's environment, times the exact call the daemon
makes under its lock when a flow's first data is complete (``ExfilWatch.first_data`` on one
packet: payload gathering, HTTP parse, fingerprint search, alert building) and, separately,
``SecretMatcher.find`` alone and the scrub of one connection record. Inputs: a 600-byte GET
with a query, a 4 KiB POST (the inspection budget) and a 1400-byte opaque payload; none carries
a secret, the common case (a hit adds one alert). Prints one JSON object; the figures are
medians and 99th percentiles in microseconds.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scapy.layers.inet import IP, TCP

from egress_monitor import attribution
from egress_monitor.builds import BuildRegistry
from egress_monitor.detect.secrets import scrub_record, select
from egress_monitor.events import ExecInfo, FlowKey, Protocol
from egress_monitor.exfil import ExfilWatch
from egress_monitor.policy.engine import Subject
from egress_monitor.policy.loader import no_policy
from egress_monitor.process_tree import Node
from egress_monitor.roles import Role

FLOW = FlowKey(4, Protocol.TCP, 6, "198.51.100.1", 40000, "198.51.100.2", 80)


def environ(n: int) -> bytes:
    base = [b"HOME=/home/runner", b"PATH=/usr/local/bin:/usr/bin:/bin", b"TERM=xterm",
            b"CARGO_PKG_NAME=evil-dep", b"RUSTFLAGS=-C debuginfo=1"]
    secrets = [f"SVC{i}_TOKEN=".encode() + base64.b64encode(os.urandom(30)) for i in range(n)]
    return b"\0".join(base + secrets)


def payloads() -> dict[str, bytes]:
    query = "&".join(f"k{i}=v{i:04d}" for i in range(60))
    return {
        "get_600B": f"GET /a/b?{query} HTTP/1.1\r\nHost: x.example\r\nUser-Agent: b\r\n\r\n"
        .encode()[:600].rstrip(b"\r\n") + b"\r\n\r\n",
        "post_4KiB": b"POST /u HTTP/1.1\r\nHost: x.example\r\nContent-Length: 4000\r\n\r\n"
        + os.urandom(3000).hex().encode()[:4000],
        "opaque_1400B": os.urandom(1400),
    }


def percentiles(samples: list[float]) -> dict[str, float]:
    samples.sort()
    return {"p50_us": round(statistics.median(samples) * 1e6, 1),
            "p99_us": round(samples[int(len(samples) * 0.99)] * 1e6, 1)}


def bench(n_secrets: int, rounds: int) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    w = ExfilWatch(emit=out.append, counters=lambda f: None, upload_threshold=1 << 20,
                   wall=time.time)
    root = Node(pid=1, parent=None, info=ExecInfo(exe="/usr/bin/cargo", argv=("cargo", "b")))
    root.build = BuildRegistry(31000, 2).start(root, ts_ns=0, wall=0.0, via="cargo")
    root.role = Role.BUILD_SCRIPT
    env = environ(n_secrets)
    t0 = time.perf_counter()
    w.learn_secrets(root.build, env)
    learn = time.perf_counter() - t0
    matcher = w.secrets[root.build.id]
    result: dict[str, Any] = {"secrets": n_secrets, "fingerprints": len(matcher._exact)
                              + len(matcher._folded), "learn_us": round(learn * 1e6, 1)}
    policy = no_policy()
    for name, data in payloads().items():
        pkt = bytes(IP(src=FLOW.src, dst=FLOW.dst) / TCP(sport=FLOW.src_port,
                                                         dport=FLOW.dst_port) / data)
        verdicts, finds = [], []
        for _ in range(rounds):
            w.accepted(FLOW, root, root.build, ())
            t0 = time.perf_counter()
            w.first_data(FLOW, pkt, lambda _s: Subject(role="build-script"), policy, True)
            verdicts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            matcher.find(data)
            finds.append(time.perf_counter() - t0)
        result[name] = {"first_data_verdict": percentiles(verdicts),
                        "find_only": percentiles(finds)}
    record = attribution.connection_event(wall=0.0, flow=FLOW, owner=root, build=root.build,
                                          decision="allow", mode="enforce")
    scrubs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        scrub_record(record, matcher)
        scrubs.append(time.perf_counter() - t0)
    result["scrub_connection_record"] = percentiles(scrubs)
    assert select(env).keys() == set(matcher.names)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args()
    print(json.dumps({"python": sys.version.split()[0],
                      "results": [bench(n, args.rounds) for n in (0, 10, 100)]}, indent=1))


if __name__ == "__main__":
    main()
