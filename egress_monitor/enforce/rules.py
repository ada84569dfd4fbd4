"""Render the daemon's firewall state as ``iptables-restore`` input (pure).

A filter chain per family, jumped to from the top of ``filter OUTPUT`` only by packets that start
a flow or that conntrack cannot place (INVALID, UNTRACKED: a raw socket must not slip past):
packets of established flows, from builds or not, never enter the chain (measured: matching
the cgroup first cost an established build flow 4% of its throughput). The chain holds one
rule per live build: its cgroup (xt_cgroup matches the cgroup and all below it) goes to the
build's own queue number. Nothing else is matched, so traffic of processes outside builds
is never touched. A nat chain redirects each build's DNS to the daemon's resolver.

Fail closed: with the daemon gone a build's queue has no reader and the kernel drops its
packets (a client gives up at its own timeout), while the rest of the host is unaffected; a
full queue drops too. ``--queue-bypass`` is never used: it makes the queue rule ACCEPT when
nobody reads the queue. For an immediate refusal while the daemon is down,
``egress-monitor failclosed`` (systemd's ExecStopPost) renders the chain with ``refuse``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

CHAIN = "EGRESS-MON"
DATA_CHAIN = "EGRESS-MON-DATA"
NAT_CHAIN = "EGRESS-MON-NAT"
# A connmark bit on every flow a build starts, so that the first data packets of exactly
# those flows can be looked at (HTTP request heads, TLS ClientHello) and nothing else.
FLOW_MARK = 0x00100000
# Packets 2 to 5 of a flow in the sending direction: the handshake's ACK and the first data,
# which a client may send in several small pieces (a request written in parts).
DATA_PACKETS = "2:5"
DATA_PACKET_BUDGET = 4
JUMP_MATCH = ("-m", "conntrack", "--ctstate", "NEW,INVALID,UNTRACKED")
# A queue verdict that refuses a packet marks it and asks for it again (NF_REPEAT); the
# first rules of the chain then reject it at once, so the process sees a refusal instead
# of retrying until its own timeout. Any mark a process sets on its own sockets can only
# get its own packets refused.
DENY_MARK = 0x454D0001
# A refused TCP connection is sent to the daemon's sinkhole instead (nat REDIRECT), which
# records what the process tried to send and closes.
SINK_MARK = 0x454D0002
LOOPBACK = {4: "127.0.0.1/32", 6: "::1/128"}
ADMIN_PROHIBITED = {4: "icmp-admin-prohibited", 6: "icmp6-adm-prohibited"}


def jump_spec(chain: str = CHAIN) -> list[str]:
    """The rule in filter OUTPUT that sends flow-starting packets to ``chain``."""
    return ["OUTPUT", *JUMP_MATCH, "-j", chain]


def data_jump_spec(chain: str = DATA_CHAIN) -> list[str]:
    """The rule in filter OUTPUT that sends the first packets of builds' flows to ``chain``.

    Established packets of every other flow fail the state and connmark matches at once.
    Only the original direction is first data: on loopback a build's own server answers its
    own client from inside the build's cgroup, and its replies are not new flows.
    Needs ``net.netfilter.nf_conntrack_acct=1`` (the daemon sets it) for connbytes.
    """
    return ["OUTPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED", "--ctdir", "ORIGINAL",
            "-m", "connmark",
            "--mark", f"{FLOW_MARK:#x}/{FLOW_MARK:#x}", "-m", "connbytes", "--connbytes",
            DATA_PACKETS, "--connbytes-dir", "original", "--connbytes-mode", "packets",
            "-j", chain]


def nat_jump_spec(chain: str = NAT_CHAIN) -> list[str]:
    """The rule in nat OUTPUT (which sees only first packets) that sends them to ``chain``."""
    return ["OUTPUT", "-j", chain]


@dataclass(frozen=True, slots=True)
class BuildRule:
    """What the ruleset needs to know of one build."""

    cgroup: str  # path below the cgroup2 mount, as xt_cgroup --path takes it
    queue: int
    refuse: bool = False  # refused at once instead of queued (a build nobody can judge)


@dataclass(frozen=True, slots=True)
class MarkGate:
    """Packets whose mark carries the BPF stamp (``tag`` under ``mask``: a build member's
    socket, from its first instruction) go to ``queue``, after the per-build cgroup rules:
    the build is then known from the creator the mark names, not from a cgroup that a
    process may not have been moved into yet."""

    tag: int
    mask: int
    queue: int
    fast: int = 0  # the fast bit (bpf/fast.py): a SYN the kernel sent ahead; 0: none

    @property
    def match(self) -> str:
        return f"-m mark --mark {self.tag:#x}/{self.mask:#x}"

    @property
    def ahead(self) -> str:
        """The match for a member's SYN sent ahead (stamp with the fast bit)."""
        both = self.mask | self.fast
        return f"-m mark --mark {self.tag | self.fast:#x}/{both:#x}"


def _quote(path: str) -> str:
    if any(c in path for c in "\"\n\r"):
        raise ValueError(f"cgroup path cannot be rendered: {path!r}")
    return f'"{path}"'


def render(builds: Iterable[BuildRule], family: int = 4, resolver_port: int | None = None,
           chain: str = CHAIN, nat_chain: str = NAT_CHAIN, refuse: bool = False,
           data_chain: str = DATA_CHAIN, sink_port: int | None = None,
           mark_gate: MarkGate | None = None, late_tcp: bool = False) -> str:
    """The ``iptables-restore --noflush`` input (``ip6tables-restore`` for family 6) that
    sets every chain to exactly these rules.

    Declaring a chain flushes it, so applying the text is atomic and idempotent.

    A new TCP connection of a build is judged in ``nat OUTPUT``, which sees exactly the
    first packet of each connection: there a refusal can still change the destination, to
    the daemon's sinkhole (``sink_port``) that records what the process tried to send. Other
    new flows, and TCP packets conntrack cannot place, are judged in ``filter OUTPUT``. With a
    ``resolver_port``, every build's DNS is redirected to the daemon's resolver. With
    ``refuse`` (the daemon is down: ``egress-monitor failclosed``), each build's new flows are
    refused at once instead of queued; a rule with ``refuse`` set is refused that way alone.
    With a ``mark_gate``, stamped packets no cgroup rule took are gated the same way on the
    gate's queue (refused with ``refuse``). A gate with a ``fast`` bit lets a member's SYN
    that the kernel sent ahead (``bpf/fast.py``) pass nat unqueued, with ``FLOW_MARK`` so
    that its handshake's ACK and first data are queued and judged (not with ``refuse``).

    With ``late_tcp`` (a gate opened in a namespace where a build may already be connecting:
    enforce/netns.py), a TCP connection whose first SYN went out before these rules existed
    (the kernel's backstop dropped it) is judged in filter: nat never sees its retransmitted
    SYNs again, since conntrack consults nat only for a connection's first packet. Such a
    connection lacks ``FLOW_MARK``, so its first data is not inspected; a sinkhole refusal
    of it is a reset (it cannot be redirected any more).
    """
    ordered = sorted(builds, key=lambda r: (r.queue, r.cgroup))
    gates: list[tuple[str, int, bool]] = [
        (f"-m cgroup --path {_quote(r.cgroup)}", r.queue, refuse or r.refuse) for r in ordered]
    if mark_gate is not None:
        gates.append((mark_gate.match, mark_gate.queue, refuse))
    lo = LOOPBACK[family]
    # nat first: iptables-restore commits tables in order, and a build's DNS must already be
    # redirected when its filter rules start to judge (else a query in the window is judged
    # as a plain connection to port 53).
    nat = ["*nat", f":{nat_chain} - [0:0]"]
    # A refused packet comes back marked: to the sinkhole, or on to filter's reset.
    if sink_port is not None:
        nat.append(f"-A {nat_chain} -p tcp -m mark --mark {SINK_MARK:#x}"
                   f" -j REDIRECT --to-ports {sink_port}")
    nat.append(f"-A {nat_chain} -m mark --mark {DENY_MARK:#x} -j RETURN")
    if mark_gate is not None and mark_gate.fast and not refuse:
        # A SYN the connect hook sent ahead (bpf/fast.py): its first data is inspected and
        # its handshake's ACK judged; the backstop passes nothing else of it before that.
        # DNS is never sent ahead (the daemon allows no port 53 ahead; this rule agrees).
        ahead = f"-A {nat_chain} -p tcp ! --dport 53 {mark_gate.ahead}"
        nat += [f"{ahead} -j CONNMARK --or-mark {FLOW_MARK:#x}", f"{ahead} -j RETURN"]
    for what, queue, refused in gates:
        match = f"-A {nat_chain} {what}"
        if resolver_port is not None:
            for proto in ("udp", "tcp"):
                nat.append(f"{match} -p {proto} --dport 53 -j REDIRECT --to-ports "
                           f"{resolver_port}")
        if not refused:
            nat += [f"{match} -j CONNMARK --or-mark {FLOW_MARK:#x}",
                    f"{match} -p tcp -j NFQUEUE --queue-num {queue}"]
    nat.append("COMMIT")
    lines = ["*filter", f":{chain} - [0:0]", f":{data_chain} - [0:0]"]
    for c in (chain, data_chain):
        lines += [f"-A {c} -m mark --mark {DENY_MARK:#x} -p tcp -j REJECT --reject-with "
                  "tcp-reset",
                  f"-A {c} -m mark --mark {DENY_MARK:#x} -j REJECT --reject-with "
                  f"{ADMIN_PROHIBITED[family]}"]
    for port, protos in ((resolver_port, ("udp", "tcp")), (sink_port, ("tcp",))):
        if port is not None:
            for proto in protos:
                lines.append(f"-A {chain} -d {lo} -p {proto} --dport {port} -j RETURN")
    if sink_port is not None:
        lines.append(f"-A {data_chain} -d {lo} -p tcp --dport {sink_port} -j RETURN")
        if late_tcp:  # refused to the sinkhole, but nat could not redirect it: reset
            lines.append(f"-A {chain} -m mark --mark {SINK_MARK:#x} -p tcp -j REJECT"
                         " --reject-with tcp-reset")
    for what, queue, refused in gates:
        match = f"-A {chain} {what}"
        if refused:
            lines += [f"{match} -p tcp -j REJECT --reject-with tcp-reset",
                      f"{match} -j REJECT --reject-with {ADMIN_PROHIBITED[family]}"]
        else:
            # Never --queue-bypass: it makes the rule ACCEPT when nobody reads the queue.
            # New TCP connections were judged in nat; what conntrack cannot place was not.
            lines += [f"{match} ! -p tcp -j NFQUEUE --queue-num {queue}",
                      f"{match} -p tcp -m conntrack --ctstate INVALID,UNTRACKED"
                      f" -j NFQUEUE --queue-num {queue}",
                      f"-A {data_chain} {what} -p tcp -j NFQUEUE --queue-num {queue}"]
            if late_tcp:
                lines.append(f"{match} -p tcp -m conntrack --ctstate NEW -m connmark !"
                             f" --mark {FLOW_MARK:#x}/{FLOW_MARK:#x}"
                             f" -j NFQUEUE --queue-num {queue}")
    lines.append("COMMIT")
    lines = nat + lines
    return "\n".join(lines) + "\n"
