"""What a build tries to send: the first data of its flows, its uploads, its blocked attempts.

Holds three bounded tables, all touched under the daemon's state lock:

- accepted TCP flows until their first data is read (request head, ClientHello), which may
  come in pieces over the first packets (``DATA_PACKET_BUDGET``);
- accepted off-host TCP and UDP flows whose kernel byte counters are checked for uploads;
- refused TCP connections on their way to the sinkhole, which reports what they sent.

Alerts go out through the ``emit`` callable; no payload byte is kept anywhere.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from egress_monitor import attribution
from egress_monitor.alerts import Alert, Severity, raise_alert
from egress_monitor.builds import Build
from egress_monitor.detect.http import MAX_FIRST_DATA, first_data_complete
from egress_monitor.detect.secrets import (
    DEFAULT_RULES,
    SecretHit,
    SecretMatcher,
    SecretRules,
    file_secrets,
    scrub_record,
    select,
)
from egress_monitor.enforce.rules import DATA_PACKET_BUDGET
from egress_monitor.events import FlowKey, Protocol
from egress_monitor.firstdata import judge, pending, shape
from egress_monitor.packets import tcp_payload
from egress_monitor.policy.engine import Subject, is_loopback
from egress_monitor.policy.schema import Policy
from egress_monitor.process_tree import Node
from egress_monitor.roles import Role

log = logging.getLogger(__name__)
MAX_FLOWS = 65536
MAX_UPLOAD_FLOWS = 16384
MAX_SUNK = 4096
SUNK_WAIT_S = 5.0
MAX_ENDED_SECRETS = 64


@dataclass(slots=True)
class Seen:
    """A flow of a build as it was judged: who, which build, the names of its address."""

    flow: FlowKey
    owner: Node | None
    build: Build
    names: tuple[str, ...]
    data: bytearray = field(default_factory=bytearray)
    packets: int = 0
    done: bool = False  # first data judged; its remaining first packets pass without a look

    def dst(self, dst: tuple[str, int] | None = None) -> dict[str, Any]:
        """The ``dst`` object of evidence (``dst`` overrides the address, e.g. a sinkhole's
        original destination)."""
        ip, port = dst or (self.flow.dst, self.flow.dst_port)
        return {"ip": ip, "port": port, "names": list(self.names)}


class ExfilWatch:
    """The three tables and the alerts they raise."""

    def __init__(self, *, emit: Callable[[Alert], None],
                 counters: Callable[[FlowKey], tuple[int, int] | None],
                 upload_threshold: int, wall: Callable[[], float],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self._counters = counters
        self.upload_threshold = upload_threshold
        self._wall = wall
        self._clock = clock
        self.flows: OrderedDict[tuple[str, int, str, int], Seen] = OrderedDict()
        self.uploads: OrderedDict[tuple[str, int, str, int, int], Seen] = OrderedDict()
        self.sunk: OrderedDict[tuple[str, int], tuple[Seen, str, float]] = OrderedDict()
        self.secrets: dict[str, SecretMatcher] = {}  # build id -> its secrets' fingerprints
        self._ended_secrets: OrderedDict[str, SecretMatcher] = OrderedDict()

    # -- secrets ---------------------------------------------------------------------------
    def learn_secrets(self, build: Build, environ: bytes,
                      rules: SecretRules = DEFAULT_RULES) -> None:
        """A member of ``build`` exec'd with this raw environment: fingerprint its secrets.

        The bytes are not kept; an environment already read for the build is skipped.
        """
        matcher = self.secrets.setdefault(build.id, SecretMatcher())
        if not matcher.seen_environ(environ):
            matcher.add(select(environ, rules))

    def learn_file(self, build: Build, label: str, content: bytes) -> None:
        """A member of ``build`` read a credential file: fingerprint the values in it (held in
        memory only, like the environment's; the bytes are not kept)."""
        matcher = self.secrets.setdefault(build.id, SecretMatcher())
        matcher.add(file_secrets(label, content))

    def secret_hit(self, build: Build, data: bytes, role: str | None) -> SecretHit | None:
        """The build's secrets ``data`` carries. cargo's own flows are not looked at: it
        sends the registry token to the registry and git credentials to git hosts."""
        matcher = self.secrets.get(build.id)
        if matcher is None or role == str(Role.CARGO):
            return None
        return matcher.find(data)

    def scrub(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record with the values of its build's secrets replaced, wherever they are
        (a build that ended a moment ago still counts: its last records come after)."""
        build = record.get("build")
        bid = build.get("id", "") if isinstance(build, dict) else ""
        matcher = self.secrets.get(bid) or self._ended_secrets.get(bid)
        return record if matcher is None else scrub_record(record, matcher)

    def first_datagram(self, flow: FlowKey, packet: bytes, owner: Node | None, build: Build,
                       names: tuple[str, ...], enforce: bool) -> bool:
        """The first datagram of a new UDP flow (or any new flow's first packet, such as a
        SYN carrying data): whether to refuse it for carrying a secret's value. The whole
        packet is searched; its headers are too short to hold a fingerprint."""
        hit = self.secret_hit(build, packet, str(attribution.role_of(owner)))
        if hit is None:
            return False
        self._alert(Seen(flow, owner, build, names), "secret_value", "critical",
                    {"protocol": str(flow.protocol), "bytes_seen": len(packet),
                     "secret_names": list(hit.names), "encodings": list(hit.encodings),
                     "dst": {"ip": flow.dst, "port": flow.dst_port, "names": list(names)}},
                    blocked=enforce)
        return enforce

    # -- recording verdicts ----------------------------------------------------------------
    def accepted(self, flow: FlowKey, owner: Node | None, build: Build,
                 names: tuple[str, ...]) -> None:
        """A new flow of a build was let through: watch its first data and its volume."""
        if flow.protocol is Protocol.TCP:
            self.flows[(flow.src, flow.src_port, flow.dst, flow.dst_port)] = \
                Seen(flow, owner, build, names)
            while len(self.flows) > MAX_FLOWS:
                self.flows.popitem(last=False)
        if flow.protocol in (Protocol.TCP, Protocol.UDP) and not is_loopback(flow.dst):
            self.uploads[(flow.src, flow.src_port, flow.dst, flow.dst_port,
                          flow.proto_number)] = Seen(flow, owner, build, names)
            while len(self.uploads) > MAX_UPLOAD_FLOWS:
                self.uploads.popitem(last=False)

    def sinking(self, flow: FlowKey, owner: Node | None, build: Build,
                names: tuple[str, ...], rule: str) -> None:
        """A refused TCP connection is being sent to the sinkhole."""
        self.sunk[(flow.src, flow.src_port)] = (Seen(flow, owner, build, names), rule,
                                                self._clock())
        while len(self.sunk) > MAX_SUNK:
            self.sunk.popitem(last=False)

    # -- first data ------------------------------------------------------------------------
    def first_data(self, flow: FlowKey, packet: bytes, subject_of: Callable[[Seen], Subject],
                   policy: Policy, enforce: bool) -> bool | None:
        """A packet of an accepted TCP flow: None when the flow is not one of ours (judge it
        as a new flow), else whether to refuse it (a proxied request the policy denies).

        Each packet is let through at once: a client that writes its request in pieces sends
        the next piece only once this one is acknowledged.
        """
        key = (flow.src, flow.src_port, flow.dst, flow.dst_port)
        seen = self.flows.get(key)
        if seen is None:
            return None
        seen.packets += 1
        if seen.done:
            if seen.packets >= DATA_PACKET_BUDGET:
                del self.flows[key]
            return False
        payload = tcp_payload(packet)
        if not payload and not seen.data:  # the handshake's ACK
            return False
        seen.data += payload
        gathered = bytes(seen.data)
        if (not first_data_complete(gathered) or pending(gathered)) \
                and seen.packets < DATA_PACKET_BUDGET and len(gathered) < MAX_FIRST_DATA:
            return False
        data = bytes(seen.data)
        seen.done, seen.data = True, bytearray()
        return self._judge(seen, data, subject_of(seen), policy, enforce)

    def _judge(self, seen: Seen, data: bytes, subject: Subject, policy: Policy,
               enforce: bool) -> bool:
        judgement = judge(data, spent=seen.packets >= DATA_PACKET_BUDGET, names=seen.names,
                          dst=seen.dst(), subject=subject, policy=policy, enforce=enforce,
                          hit=self.secret_hit(seen.build, data, subject.role))
        for kind, severity, evidence in judgement.alerts:
            self._alert(seen, kind, severity, evidence, blocked=judgement.refuse)
        return judgement.refuse

    def syn_data(self, flow: FlowKey, packet: bytes, subject_of: Callable[[Seen], Subject],
                 policy: Policy, enforce: bool) -> bool:
        """A new TCP flow just accepted: data its SYN carries (TCP Fast Open) is first data
        like any other, judged before the SYN leaves. Whether to refuse the SYN."""
        if not tcp_payload(packet):
            return False
        return bool(self.first_data(flow, packet, subject_of, policy, enforce))

    # -- the sinkhole ----------------------------------------------------------------------
    def sunk_attempt(self, peer: tuple[str, int], dst: tuple[str, int] | None,
                     data: bytes) -> None:
        """From the sinkhole: what a refused connection tried to send."""
        entry = self.sunk.pop((peer[0], peer[1]), None)
        if entry is None:
            log.info("sinkhole: a connection from %s that no refusal sent there", peer)
            return
        seen, rule, _since = entry
        hit = self.secret_hit(seen.build, data, attribution.role_of(seen.owner))
        evidence = {"protocol": "tcp", **shape(data, hit), "dst": seen.dst(dst), "rule": rule}
        if hit is not None:
            evidence.update(secret_names=list(hit.names), encodings=list(hit.encodings))
        self._alert(seen, "blocked_attempt", "critical", evidence, blocked=True)

    def expire_sunk(self) -> None:
        """A refusal whose connection never reached the sinkhole is still an attempt."""
        now = self._clock()
        while self.sunk and now - next(iter(self.sunk.values()))[2] > SUNK_WAIT_S:
            _key, (seen, rule, _since) = self.sunk.popitem(last=False)
            self._alert(seen, "blocked_attempt", "critical",
                        {"protocol": str(seen.flow.protocol), "bytes_seen": 0,
                         "dst": seen.dst(), "rule": rule}, blocked=True)

    # -- uploads ---------------------------------------------------------------------------
    def check_uploads(self) -> None:
        """Read the kernel's byte counters of builds' off-host flows; alert past the limit.

        A flow leaves the watch list once it is reported, or once conntrack has forgotten it.
        """
        for key, seen in list(self.uploads.items()):
            try:
                counts = self._counters(seen.flow)
            except OSError as exc:
                log.warning("conntrack counters of %s: %s", seen.flow, exc)
                continue
            if counts is None:
                del self.uploads[key]
                continue
            sent, received = counts
            if sent < self.upload_threshold:
                continue
            del self.uploads[key]
            self._alert(seen, "upload", "critical",
                        {"protocol": str(seen.flow.protocol), "bytes_out": sent,
                         "bytes_in": received, "threshold": self.upload_threshold,
                         "dst": seen.dst()}, blocked=False)

    def forget_build(self, build: Build) -> None:
        """A build ended: a last look at its uploads, then drop its entries."""
        self.check_uploads()
        for fkey in [k for k, s in self.flows.items() if s.build is build]:
            del self.flows[fkey]
        for ukey in [k for k, s in self.uploads.items() if s.build is build]:
            del self.uploads[ukey]
        matcher = self.secrets.pop(build.id, None)
        if matcher is not None:
            self._ended_secrets[build.id] = matcher
            while len(self._ended_secrets) > MAX_ENDED_SECRETS:
                self._ended_secrets.popitem(last=False)

    def _alert(self, seen: Seen, kind: str, severity: Severity, evidence: dict[str, Any], *,
               blocked: bool) -> None:
        self._emit(raise_alert(wall=self._wall(), kind=kind, severity=severity,
                               evidence=evidence, rule=evidence.get("rule"), blocked=blocked,
                               owner=seen.owner, build=seen.build))
