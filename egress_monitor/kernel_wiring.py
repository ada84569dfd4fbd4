"""The daemon's writes into the kernel's verdict side, and its checks of them (part of the
composition root).

After a judgment the daemon writes what the kernel's programs then enforce on their own
(docs/bpf.md): the flow's verdict for the backstop (``verdicts``, bound to the creator it
was judged for) and, for a TCP connection the policy allowed, the creator's key for the SYN
ahead (``fast``, under the daemon's lease). Every second it renews the lease, checks that the
``fast`` map holds only keys it wrote and that its cgroup programs are still attached. Before
a judgment it holds a process to the role the kernel gives it (the tree may have missed an
exec). Nothing here decides: the decisions are the policy's and the gate's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import struct
import time
from typing import TYPE_CHECKING

from egress_monitor import gate
from egress_monitor.alerts import raise_alert
from egress_monitor.bpf import programs as bpf_programs
from egress_monitor.bpf.fast import LEASE_S, fast_key
from egress_monitor.builds import Build
from egress_monitor.events import FlowKey, Protocol
from egress_monitor.policy.engine import is_loopback
from egress_monitor.process_tree import Node
from egress_monitor.roles import Role
from egress_monitor.tamper import nobody

if TYPE_CHECKING:
    from egress_monitor.daemon import Daemon

log = logging.getLogger(__name__)


class KernelWiring:
    """Owned by the daemon (one thread); does nothing while the daemon has no kernel side
    (``--degraded``)."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def hold(self, node: Node) -> None:
        """Never judge a process above the role the kernel holds it at: the tree may have
        missed an exec (lost events) that made cargo's child crate code."""
        bpf = self.d.bpf
        if bpf is None or str(node.role) not in ("cargo", "rustc"):
            return
        value = bpf.member(node.pid)
        if value is None:
            return
        kernel = bpf_programs.member_role(value)
        held = {bpf_programs.ROLE_CRATE: "other", bpf_programs.ROLE_NONE: "other"}.get(kernel)
        if kernel == bpf_programs.ROLE_RUSTC and str(node.role) == "cargo":
            held = "rustc"
        if held is not None:
            log.warning("pid %d: the tree said %s, the kernel holds it lower (%s)", node.pid,
                        node.role, held)
            node.role = Role(held)
            node.crate = None if held == "other" else node.crate
            node.ceiling = bpf_programs.ROLE_CRATE if held == "other" else node.ceiling
            node.basis = f"held to the kernel's role ({held}; the tree had missed an exec)"

    def allow(self, flow: FlowKey, build: Build, creator: int | None) -> None:
        """Write the flow's verdict for the backstop (bpf/programs.py ``em_backstop``), which
        drops a member's packet whose flow has none, or whose socket another process than
        ``creator`` (the stamp's, when judged by it) made. Raises when it cannot be written:
        the packet is then refused."""
        if self.d.bpf is None:
            return
        key = bpf_programs.flow_key(
            flow.family, flow.proto_number, ipaddress.ip_address(flow.src).packed,
            ipaddress.ip_address(flow.dst).packed, flow.src_port, flow.dst_port)
        self.d.bpf.allow_flow(key, creator)
        build.verdict_keys.add(key)

    def send_ahead(self, flow: FlowKey, build: Build, creator: Node | None) -> None:
        """Let ``creator``'s later connects to this TCP destination send their SYN ahead of
        the judgment (bpf/fast.py): only for a flow the policy itself allowed (not one audit
        let through), of a process known by its stamp, off the host, never DNS. A failure
        to write costs speed only."""
        bpf = self.d.bpf
        if bpf is None or creator is None or flow.protocol is not Protocol.TCP \
                or not bpf.sends_ahead or flow.dst_port in (53, gate.DOT_PORT) \
                or is_loopback(flow.dst):
            return
        key = fast_key(creator.pid, flow.family, ipaddress.ip_address(flow.dst).packed,
                       flow.dst_port)
        keys = build.ahead.setdefault(creator.pid, set())
        if key in keys:
            return
        try:
            bpf.allow_fast(key)
        except OSError as exc:
            log.warning("cannot let pid %d send SYNs ahead: %s", creator.pid, exc)
            return
        keys.add(key)

    def forget_ahead(self, build: Build, pid: int | None = None) -> None:
        """Take back what :meth:`send_ahead` allowed: one process's (it exited), or the
        build's (it ended, or the policy changed)."""
        for tgid in [pid] if pid is not None else list(build.ahead):
            for key in build.ahead.pop(tgid, ()):
                if self.d.bpf is not None:
                    with contextlib.suppress(OSError):
                        self.d.bpf.forget_fast(key)

    def renew_ahead(self) -> None:
        """Renew the kernel's lease on sending SYNs ahead (bpf/fast.py): a daemon killed
        outright stops renewing, and within LEASE_S every SYN is queued again (where nobody
        reads it) instead of leaving ahead to destinations allowed before."""
        bpf = self.d.bpf
        if bpf is None or not bpf.sends_ahead:
            return
        try:
            bpf.renew_ahead(time.monotonic_ns() + int(LEASE_S * 1e9))
        except OSError as exc:
            log.warning("cannot renew the SYN-ahead lease: %s", exc)

    def check_ahead(self) -> None:
        """Every key in the kernel's ``fast`` map must be one the daemon wrote: a root build
        writing its own (bpf(2) by map id) would send SYNs ahead to anywhere (nothing of
        those flows would pass but the SYN, still a few bytes each). Such keys are deleted
        and alerted on."""
        bpf = self.d.bpf
        if bpf is None or not bpf.sends_ahead:
            return
        ours = {k for b in self.d.registry.active() for keys in b.ahead.values() for k in keys}
        try:
            foreign = [k for k in bpf.fast_keys() if k not in ours]
        except OSError as exc:
            log.warning("cannot read the fast map: %s", exc)
            return
        if not foreign:
            return
        for key in foreign:
            with contextlib.suppress(OSError):
                bpf.forget_fast(key)
        log.error("%d SYN-ahead key(s) the daemon never wrote were in the kernel: deleted",
                  len(foreign))
        self.d._emit(raise_alert(
            wall=self.d._wall(), kind="tamper", severity="critical", rule="tamper",
            blocked=True, actor=nobody(),
            evidence={"tamper": "fast_map", "keys": len(foreign),
                      "creators": sorted({struct.unpack_from("=I", k)[0] for k in foreign})}))

    def check_programs(self) -> None:
        """Our cgroup programs still attached (a root build can detach them by id): put
        back. The tamper watch, which ran just before, raised the alert."""
        bpf = self.d.bpf
        if bpf is None or not bpf.intact():
            return
        back = bpf.reattach()
        log.error("BPF programs detached by someone else; reattached: %s",
                  ", ".join(back) or "none")
