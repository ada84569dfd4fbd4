"""The NFQUEUE floor: an accept-all queue consumer on the daemon's own rule placement (root).

    floor.py serve               make the floor's cgroup and chains, accept every packet
                                 queued from that cgroup; prints ``ready CGROUP`` then serves
                                 until SIGTERM, then removes its rules and cgroup
    floor.py exec CGROUP -- CMD  run CMD inside the floor's cgroup

What a build's packet cannot avoid paying with any NFQUEUE-based monitor: the rules are the
ones ``enforce/rules.py`` renders for one build (the nat chain's cgroup match and queue rule
for new TCP connections, the filter chain's for other new flows and for the first data
packets), in chains of their own named ``EGRESS-FLOOR*`` so the daemon's are untouched, and
the consumer is the daemon's own ``QueueSocket`` answering ``NF_ACCEPT`` at once. The
difference between the daemon's added latency and this one's is the daemon's own work.
The cgroup is named ``egress-floor-<pid>``, not like a build's, so no daemon adopts it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egress_monitor.enforce.cgroups import Cgroups
from egress_monitor.enforce.rules import (
    BuildRule,
    data_jump_spec,
    jump_spec,
    nat_jump_spec,
    render,
)
from egress_monitor.sources.nfqueue import NF_ACCEPT, QueueSocket

CHAIN = "EGRESS-FLOOR"
DATA_CHAIN = "EGRESS-FLOOR-DATA"
NAT_CHAIN = "EGRESS-FLOOR-NAT"
# Below the daemon's default queue range (31000 and up), so both can run at once.
QUEUE = 30999
FAMILIES = ((4, "iptables", "iptables-restore"), (6, "ip6tables", "ip6tables-restore"))


def _jumps() -> list[tuple[str, list[str]]]:
    return [("filter", jump_spec(CHAIN)), ("filter", data_jump_spec(DATA_CHAIN)),
            ("nat", nat_jump_spec(NAT_CHAIN))]


def _run(argv: list[str], stdin: str | None = None, check: bool = True) -> None:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


def install(cgroup: str) -> None:
    """The chains with one build's rules for ``cgroup`` and the jumps into them."""
    rule = BuildRule(cgroup=cgroup, queue=QUEUE)
    for family, tool, restore in FAMILIES:
        _run([restore, "-w", "--noflush"], render([rule], family, chain=CHAIN,
                                                  nat_chain=NAT_CHAIN, data_chain=DATA_CHAIN))
        for table, spec in _jumps():
            _run([tool, "-w", "-t", table, "-I", spec[0], "1", *spec[1:]])


def remove() -> None:
    """Jumps first, then the chains; each step on its own, so one failure leaves no other."""
    for _family, tool, _restore in FAMILIES:
        for table, spec in _jumps():
            _run([tool, "-w", "-t", table, "-D", *spec], check=False)
        for table, chain in (("filter", CHAIN), ("filter", DATA_CHAIN), ("nat", NAT_CHAIN)):
            _run([tool, "-w", "-t", table, "-F", chain], check=False)
            _run([tool, "-w", "-t", table, "-X", chain], check=False)


def serve() -> int:
    """Set up, print ``ready CGROUP``, accept every queued packet until SIGTERM, clean up."""
    cg = Cgroups.discover()
    # Nested below our own cgroup, as the daemon nests a build's below its root's.
    with open("/proc/self/cgroup") as f:
        own = f.read().strip().rpartition("::")[2] or "/"
    rel = cg.create(own, f"egress-floor-{os.getpid()}")
    stop_r, stop_w = os.pipe()
    signal.signal(signal.SIGTERM, lambda *_: os.write(stop_w, b"x"))
    signal.signal(signal.SIGINT, lambda *_: os.write(stop_w, b"x"))
    queue = QueueSocket()
    accepted = 0
    try:
        queue.bind_queue(QUEUE)
        install(rel)
        print(f"ready {rel}", flush=True)
        poller = select.poll()
        poller.register(queue.fileno(), select.POLLIN)
        poller.register(stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if stop_r in ready:
                break
            for packet in queue.read():
                queue.verdict(packet.queue, packet.packet_id, NF_ACCEPT)
                accepted += 1
    finally:
        remove()
        with contextlib.suppress(OSError):
            queue.close()
        cg.release(rel)
    print(f"accepted {accepted}", flush=True)
    return 0


def exec_in(cgroup: str, cmd: list[str]) -> int:
    """Move this process into the floor's cgroup, then exec ``cmd``: every socket it makes
    belongs to the cgroup from its creation."""
    cg = Cgroups.discover()
    cg.move(cgroup, os.getpid())
    os.execvp(cmd[0], cmd)


def exec_argv(cgroup: str, *cmd: str) -> list[str]:
    """The command line running ``cmd`` in the floor's cgroup."""
    return [sys.executable, str(Path(__file__).resolve()), "exec", cgroup, "--", *cmd]


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        sys.exit(serve())
    if sys.argv[1:2] == ["exec"] and len(sys.argv) > 4 and sys.argv[3] == "--":
        sys.exit(exec_in(sys.argv[2], sys.argv[4:]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
