"""The composition root: wire sources, core, enforcement and sinks; run the event loop.

One thread owns all state. The loop reads, in this order of priority, proc-connector events
(always drained before a packet is judged, so a process forked a moment ago already has its
lineage), held packets, work posted by the resolver and sinkhole threads (its mailbox),
control requests and a periodic tick. Each of them runs in isolation
(:mod:`egress_monitor.isolation`): an unexpected exception is logged, counted and contained,
and a packet it concerned is refused. The metrics HTTP server runs in its own thread and only
reads counters and scrape-time gauges.

Start order matters: the queue socket and firewall chain exist before the proc connector is
subscribed, the subscription exists before /proc is read (so nothing falls between), and the
metrics endpoint answers only once all of that is in place, so a caller can wait on it.
Closed on every exit: when the daemon stops (SIGTERM, an exception, anything that unwinds)
while builds are still running, their rules are switched to refusing and their cgroups are
kept, so they stay refused until a daemon adopts them again or ``egress-monitor cleanup``
releases them. Only a stop with no build running removes everything. A daemon that dies
without unwinding (SIGKILL, the watchdog) leaves the queueing rules, which drop (nobody reads
the queues) until ``failclosed`` turns them into refusals.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from egress_monitor import attribution, control, gate, status
from egress_monitor.alerts import Alert, connection_alert, raise_alert
from egress_monitor.bpf import programs as bpf_programs
from egress_monitor.bpf import toolchains
from egress_monitor.bpf.hostmarks import MarkConflict, host_source_nat
from egress_monitor.bpf.marks import MarkLayout
from egress_monitor.bpf.owner import BpfOwner, BpfUnavailable
from egress_monitor.bpf.view import KernelView, register_toolchains
from egress_monitor.builds import Build, BuildRegistry, NoQueueSlot
from egress_monitor.config import DaemonConfig
from egress_monitor.containers import container_of
from egress_monitor.credentials import CredentialWatch
from egress_monitor.detect.secrets import rules_for
from egress_monitor.dns.guard import DnsGuard
from egress_monitor.dns.knowledge import Knowledge
from egress_monitor.dns.server import DnsServer, host_resolvers
from egress_monitor.dns.tunnel import TunnelDetector
from egress_monitor.enforce.cgroups import (
    CgroupError,
    Cgroups,
    build_cgroup_name,
    build_queue_of,
    parse_build_cgroup,
)
from egress_monitor.enforce.firewall import Firewall, FirewallError
from egress_monitor.enforce.netns import NetnsGate
from egress_monitor.enforce.rules import DENY_MARK, BuildRule, MarkGate
from egress_monitor.enforce.sinkhole import Sinkhole
from egress_monitor.engines import EngineWatch
from egress_monitor.events import (
    FlowKey,
    ProcEventsLost,
    ProcExec,
    ProcExit,
    ProcFork,
    ProcPtrace,
    ProcUid,
    Protocol,
    QueuedPacket,
)
from egress_monitor.exfil import ExfilWatch
from egress_monitor.gate_wiring import GateWiring
from egress_monitor.iocs import Indicators, load_iocs
from egress_monitor.isolation import Isolation
from egress_monitor.kernel_wiring import KernelWiring
from egress_monitor.known_bad import STAGE, KnownBadWatch
from egress_monitor.launch_wiring import LaunchWiring
from egress_monitor.mailbox import Mailbox
from egress_monitor.netns_gates import NetnsGates, ns_inode
from egress_monitor.packets import (
    MalformedPacket,
    is_tcp_syn,
    parse_flow,
    same_connection,
    tcp_seq,
)
from egress_monitor.policy.changes import describe
from egress_monitor.policy.engine import Decision, Subject, decide, decide_name, is_loopback
from egress_monitor.policy.loader import (
    Mode,
    Policy,
    PolicyError,
    dropin_files,
    load_policy,
    no_policy,
)
from egress_monitor.process_tree import (
    BuildAnnounced,
    BuildCreated,
    Effect,
    Joined,
    MaybeEnded,
    Node,
    ProcessTree,
    Snapshot,
)
from egress_monitor.roles import starts_build
from egress_monitor.ruleguard import RuleGuard
from egress_monitor.sdnotify import Notifier
from egress_monitor.sinks.alertmanager import AlertmanagerSink
from egress_monitor.sinks.events_log import EventLog
from egress_monitor.sinks.fanout import Outputs
from egress_monitor.sinks.metrics import Metrics
from egress_monitor.sinks.terminal import TerminalSink
from egress_monitor.sources.conntrack import Conntrack
from egress_monitor.sources.fanotify import Fanotify
from egress_monitor.sources.nfgen import NftGeneration
from egress_monitor.sources.nfqueue import NF_ACCEPT, NF_DROP, NF_REPEAT, QueueSocket
from egress_monitor.sources.owners import Owners
from egress_monitor.sources.packetdiag import PacketSockets
from egress_monitor.sources.proc_connector import ProcConnector
from egress_monitor.sources.procfs import ProcFS
from egress_monitor.sources.sockdiag import SocketFinder
from egress_monitor.tamper import TamperOps, TamperWatch, nobody
from egress_monitor.where import where_fields

log = logging.getLogger(__name__)
TICK_S = 0.25
UPLOAD_POLL_S = 1.0
CONNTRACK_ACCT = "/proc/sys/net/netfilter/nf_conntrack_acct"
# The value before any daemon changed it; kept across a crash so a later clean stop restores it.
ACCT_BEFORE = "/run/egress-monitor/conntrack_acct.before"
INSTANCE_LOCK = "/run/egress-monitor/instance.lock"
RECONCILE_S = 1.0  # tamper checks: our rules put back within a second
END_DRAIN_S = 2.0  # at most this long judging what an ending build still has held
MAX_RESET_FLOWS = 4096  # TCP flows refused after their SYN: their later packets reset quietly
# The kernel's role code for a role the tree gave a process it enrols (roles only go down:
# crate code stays crate code, and cargo stays cargo only if it is cargo).
_KERNEL_ROLE = {"cargo": bpf_programs.ROLE_CARGO, "rustc": bpf_programs.ROLE_RUSTC,
                "build-script": bpf_programs.ROLE_CRATE, "crate-binary": bpf_programs.ROLE_CRATE}


class DaemonError(RuntimeError):
    """The daemon cannot start; the message says why and what to do."""


class Daemon:
    """Owns every kernel resource it creates and gives all of it back in :meth:`run`."""

    def __init__(self, config: DaemonConfig, registry: CollectorRegistry | None = None,
                 clock_ns: Callable[[], int] = time.monotonic_ns,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock_ns
        self._wall = wall
        self.policy: Policy = load_policy(config.policy_path, config.policy_dir) \
            if config.policy_path else no_policy()
        self._policy_stamp = self._stamp()
        self.mode: Mode = config.mode or self.policy.mode
        self.metrics = Metrics(registry or CollectorRegistry())
        self.metrics.set_mode(self.mode)
        self.metrics.policy_info.info({"digest": self.policy.digest,
                                       "source": self.policy.source})
        self.procfs = ProcFS(config.proc_root)
        self.registry = BuildRegistry(config.queue_base, config.max_builds)
        self.tree = ProcessTree(self.registry, self.procfs.info, clock_wall=wall)
        self.indicators = load_iocs(config.iocs_path) if config.iocs_path else Indicators()
        self.known_bad = KnownBadWatch(self.indicators)
        self.knowledge = Knowledge(config.dns_min_ttl, config.dns_max_ttl, config.dns_overlap)
        self.detector = TunnelDetector()
        self._stopping = False
        self._reload = False
        # Build cgroups no build of ours owns (a queue number outside the configured range):
        # refused at once until they empty or `cleanup` releases them.
        self._stranded: dict[str, BuildRule] = {}
        self._rules_stale = False
        self.notifier = Notifier()
        self.alertmanager: AlertmanagerSink | None = None
        self.terminal = TerminalSink(sys.stderr) if config.terminal else None
        self.isolation = Isolation(lambda where: self.metrics.internal_errors.labels(where).inc())
        # Work the resolver and sinkhole threads hand to the main loop: only it touches state.
        self.mailbox = Mailbox(self.isolation.report)
        self.creds = CredentialWatch(source=None, node_of=self.tree.get, emit=self._emit,
                                     policy=lambda: self.policy,
                                     enforce=lambda: self.mode == "enforce", wall=self._wall,
                                     learn=lambda b, label, data: self.exfil.learn_file(
                                         b, label, data))
        self.exfil = ExfilWatch(emit=self._emit, counters=lambda f: self.conntrack.counters(f),
                                upload_threshold=config.upload_threshold, wall=wall)
        self.tamper = TamperWatch(node_of=self.tree.get, builds=self.registry.active,
                                  emit=self._emit, wall=self._wall,
                                  enforce=lambda: self.mode == "enforce",
                                  elsewhere=lambda node: self._launch.of_node(node) is not None)
        self._acct_before: str | None = None
        self.started_wall = wall()
        self.layout = MarkLayout(config.mark_tag, config.mark_tag_mask, config.mark_tgid_bits,
                                 config.mark_tgid_shift, config.mark_fast)
        self.bpf: BpfOwner | None = None
        self.kernel: KernelView | None = None
        self.gates = GateWiring(self)  # gates in other network namespaces (netns.md)
        self.in_kernel = KernelWiring(self)  # verdicts and SYNs ahead written for the kernel
        self._sel: selectors.BaseSelector | None = None
        self._dns_server: DnsServer | None = None
        self._sinkhole: Sinkhole | None = None
        self._bpf_lost = 0
        self._bpf_forged = 0
        self._bpf_reused = 0
        self._own_netns: int | None = None  # the daemon's network namespace (inode), once read
        self._where_seen: collections.OrderedDict[tuple[str, int], dict[str, Any]] = \
            collections.OrderedDict()  # (build, pid) -> netns, container of its last flow
        self._ending: list[Build] = []  # builds to end once the packets held are judged
        # TCP flows refused after their SYN (a SYN sent ahead, a flow older than the daemon):
        # their next queued packets are reset without a second judgment and event.
        # Keyed by ports and addresses, with the sequence number the refused packet had.
        self._reset_flows: OrderedDict[tuple[str, int, str, int], int] = OrderedDict()
        self._ending_now = False
        # Containers an engine starts for a build (engine_launch.py, docs/netns.md).
        self._launch = LaunchWiring(self)
        self.engines = EngineWatch(
            owner=lambda: self.bpf, sockets=config.engine_sockets, node_of=self.tree.get,
            by_queue=self.registry.by_queue, emit=self._emit, policy=lambda: self.policy,
            mode=lambda: self.mode, kill=lambda rel: self.cgroups.kill(rel), wall=wall,
            clock=time.monotonic, filename_of=lambda pid: (
                r.filename if self.bpf is not None and (r := self.bpf.exec_record(pid))
                else None), on_request=self._launch.request)

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit status."""
        with contextlib.ExitStack() as stack:
            self._lock_instance(stack)
            self.events = EventLog(self.config.events_path)
            stack.callback(self.events.close)
            # No value of a build's secret goes to any sink: every record is scrubbed first.
            self.outputs = Outputs(self.events, self.metrics, scrub=self.exfil.scrub)
            if self.terminal is not None:
                self.outputs.extra.append(("terminal", self.terminal.write))
            stack.callback(self.mailbox.close)
            if self.config.alertmanager_urls:
                self.alertmanager = AlertmanagerSink(
                    list(self.config.alertmanager_urls), self.config.runner_name,
                    on_failure=self.metrics.alert_delivery_failures.inc,
                    on_drop=self.metrics.alerts_dropped.inc)
                self.alertmanager.start()
                stack.callback(self.alertmanager.stop)
                self.outputs.alertmanager = self.alertmanager
            self.cgroups = Cgroups.discover()
            self._start_bpf(stack)
            gate_ = None if self.bpf is None else MarkGate(
                self.layout.tag, self.layout.tag_mask, self.config.mark_queue,
                self.layout.fast if self.bpf.sends_ahead else 0)
            self.firewall = Firewall(resolver_port=self.config.dns_port,
                                     sink_port=self.config.sink_port, mark_gate=gate_)
            self.queue = QueueSocket()
            stack.callback(self._teardown)
            acct_seen = self._read_acct()  # before our rules load nf_conntrack, if they do
            self._sinkhole = Sinkhole(self.config.sink_port, self._sunk_attempt)
            self._start_listener(stack, self._sinkhole, "refused connections",
                                 self.config.sink_port)
            # Builds a previous daemon left stay refused from the first rule we write until
            # their adoption below binds their queues: no window opens on a restart.
            self.firewall.install(self._leftover_rules(), refuse=True)
            if self.bpf is not None:
                self.queue.bind_queue(self.config.mark_queue)
            self._enable_conntrack_acct(acct_seen)
            self.finder = SocketFinder(self.procfs)
            stack.callback(self.finder.close)
            self.owners = Owners(self.procfs, self.finder, self.cgroups, self.tree.get)
            # The resolver's hooks run in the main loop (its mailbox), which starts below.
            if self.config.dns_port is not None:
                self._start_dns(stack)
            self.gates.start(stack)  # closed before the resolver and sinkhole stop
            self._launch.start(stack)
            self.conntrack = Conntrack()
            stack.callback(self.conntrack.close)
            self.proc = ProcConnector(rcvbuf=self.config.proc_rcvbuf)
            stack.callback(self.proc.close)
            self._start_credential_watch(stack)
            self._adopt_and_seed()
            self._start_tamper_watch(stack)
            self.control = control.listen(self.config.runtime_dir)
            stack.callback(self._close_control)
            wake_r, wake_w = socket.socketpair()
            stack.enter_context(wake_r)
            stack.enter_context(wake_w)
            self._signals(wake_w)
            self.metrics.track(lambda: len(self.tree), lambda: len(self.registry.active()),
                               lambda: len(self.knowledge))
            if self.config.metrics_listen:
                host, port = self.config.metrics_listen
                server, _thread = start_http_server(port, addr=host,
                                                    registry=self.metrics.registry)
                stack.callback(server.shutdown)
            for warning in self.policy.warnings:
                log.warning("policy: %s", warning)
            self._emit(attribution.daemon_event(
                wall=self._wall(), state="start", mode=self.mode, pid=os.getpid(),
                policy_digest=self.policy.digest))
            log.info("egress-monitor ready: mode=%s, %d build(s) adopted", self.mode,
                     len(self.registry.active()))
            self.notifier.notify("READY=1", f"STATUS=watching builds, mode {self.mode}",
                                 f"MAINPID={os.getpid()}")
            self._loop(wake_r)
            self.notifier.notify("STOPPING=1")
            self._emit(attribution.daemon_event(wall=self._wall(), state="stop",
                                                mode=self.mode, pid=os.getpid()))
        return 0

    def _start_bpf(self, stack: contextlib.ExitStack) -> None:
        """Load the kernel side of identity (docs/bpf.md), or refuse to start saying why;
        ``--degraded`` runs without it."""
        if self.config.degraded:
            log.warning("running degraded: no identity from the kernel; builds are found by "
                        "names and owners by /proc scans, and every event says "
                        "attribution: degraded")
            if self.config.build_script_runners:
                log.warning("build-script runners (%s) are known by file identity in the "
                            "kernel only: degraded, they start no build",
                            ", ".join(self.config.build_script_runners))
            return
        try:
            self.bpf = BpfOwner.open(self.layout, self.cgroups.mount)
        except (BpfUnavailable, MarkConflict) as exc:
            hint = "pick socket-mark bits nobody uses with --mark-tag/--mark-tgid " \
                "(kernel.mark_tag, kernel.mark_tgid in config.yaml), " \
                if isinstance(exc, MarkConflict) else "fix that, "
            raise DaemonError(f"cannot load the kernel side of identity: {exc}\n{hint}or run "
                              "with --degraded (userspace attribution; every event marked "
                              "attribution: degraded)") from exc
        stack.callback(self._close_bpf)
        self.kernel = KernelView(self.bpf)
        registered = register_toolchains(self.kernel, rustup=self.config.rustup_homes,
                                         cargo=self.config.cargo_paths,
                                         rustc=self.config.rustc_paths,
                                         runners=self.config.build_script_runners)
        for path in toolchains.missing(self.config.build_script_runners):
            log.warning("build-script runner %s: no such file; the builds it runs are not "
                        "followed until it exists and the daemon is restarted", path)
        if not any(line.startswith("cargo ") for line in registered):
            log.warning("no toolchain cargo found (rustup homes, /usr/bin/cargo, --cargo): "
                        "no build will start by itself until one is registered")
        for line in registered:
            log.info("toolchain file: %s", line)
        for rule in host_source_nat():
            log.warning("source NAT on this host (%s): build flows it rewrites leave with a "
                        "source the daemon's verdict does not name and are dropped by the "
                        "backstop", rule)
        for name, why in self.bpf.degraded.items():
            log.warning("optional kernel program %s not in place: %s", name, why)
        self.tree.kernel = self.kernel
        self.in_kernel.renew_ahead()
        log.info("identity from the kernel: programs %s, mark %#x/%#x with the tgid in %d "
                 "bits at %d", ", ".join(sorted(self.bpf.prog_ids)), self.layout.tag,
                 self.layout.tag_mask, self.layout.tgid_bits, self.layout.tgid_shift)

    def _close_bpf(self) -> None:
        owner, self.bpf = self.bpf, None
        self.tree.kernel = self.kernel = None
        if owner is not None:
            # Builds still running stay closed in the kernel too: the cgroup programs stay
            # attached (their members' unjudged packets dropped) until the next daemon.
            running = any(b.cgroup and self._populated(b.cgroup)
                          for b in self.registry.active())
            for error in owner.close(detach=not running):
                log.error("BPF teardown: %s", error)

    def _start_dns(self, stack: contextlib.ExitStack) -> None:
        assert self.config.dns_port is not None
        upstreams = list(self.config.dns_upstreams) or host_resolvers()
        if not upstreams:
            log.warning("no upstream resolver (none given, none in /etc/resolv.conf): builds' "
                        "queries will be answered SERVFAIL")
        guard = DnsGuard(owner=self._dns_owner, knowledge=self.knowledge,
                         detector=self.detector, metrics=self.metrics, emit=self._emit,
                         decide_name=self._decide_name, mode=lambda: self.mode,
                         clock_ns=self._clock,
                         wall=self._wall, secrets=self.exfil.secret_hit)
        server = self._dns_server = DnsServer(
            guard, self.config.dns_port, upstreams,
            on_error=lambda _kind: self.metrics.dns_upstream_failures.inc(),
            submit=self.mailbox.post)
        self._start_listener(stack, server, "builds' DNS", self.config.dns_port)
        log.info("DNS guard on port %d, upstream %s", self.config.dns_port,
                 ", ".join(f"{h}:{p}" for h, p in upstreams) or "none")

    @staticmethod
    def _start_listener(stack: contextlib.ExitStack, server: DnsServer | Sinkhole, what: str,
                        port: int) -> None:
        """Start a loopback listener thread, stopped with the daemon; a taken port is fatal."""
        try:
            server.start()
        except OSError as exc:
            raise DaemonError(f"cannot listen for {what} on loopback port {port}: "
                              f"{exc.strerror or exc}") from exc
        stack.callback(server.stop)

    def _subject(self, owner: Node | None, build: Build) -> Subject:
        root_exe = build.root.exe or build.root_exe
        container, netns = self._runs_in(owner, build)
        if owner is None:
            return Subject(role="other", root_exe=root_exe, container=container, netns=netns)
        lineage = ProcessTree.lineage(owner)
        return Subject(role=str(owner.role or "other"),
                       crate=owner.crate.name if owner.crate else None,
                       version=owner.crate.version if owner.crate else None, exe=owner.exe,
                       ancestors=tuple(n.exe for n in lineage[:-1] if n.exe), root_exe=root_exe,
                       container=container, netns=netns)

    def _decide_name(self, name: str, owner: Node | None, build: Build) -> Decision:
        return decide_name(self.policy, self._subject(owner, build), name)

    def _start_credential_watch(self, stack: contextlib.ExitStack) -> None:
        """fanotify permission events for credential files (credentials.py); without them
        the daemon runs on and says so."""
        try:
            source: Fanotify | None = Fanotify()
        except OSError as exc:
            source = None
            log.warning("credential reads are not watched: %s", exc)
        self.creds.source = source
        stack.callback(self.creds.close)

    def _start_tamper_watch(self, stack: contextlib.ExitStack) -> None:
        """Tamper checks (tamper.py): the kernel reads they need, and the rule guard, which
        from here on reads our rules back after each change the firewall makes."""
        packets = PacketSockets(self.config.proc_root)
        stack.callback(packets.close)
        generation: NftGeneration | None = None
        try:
            if self.firewall.backend() == "nf_tables":
                generation = NftGeneration()
                stack.callback(generation.close)
        except (OSError, FirewallError) as exc:
            log.warning("no nftables generation (%s): reading the rules back every second",
                        exc)
        self.tamper.ops = TamperOps(
            cgroup_of=self.procfs.cgroup2, socket_inodes=self.procfs.socket_inodes,
            move=self.cgroups.move, kill_cgroup=self.cgroups.kill,
            kill_pid=lambda pid: os.kill(pid, signal.SIGKILL), packet_inodes=packets.inodes,
            bpf_intact=self.bpf.intact if self.bpf is not None else None)
        guard = RuleGuard(save=self.firewall.save,
                          restore=lambda: self.firewall.install(self._rules()),
                          chains=self.firewall.chains(), jumps=self.firewall.jump_targets(),
                          generation=generation)
        self.tamper.rules = guard
        self.firewall.on_change = guard.ours
        stack.callback(setattr, self.firewall, "on_change", None)
        guard.ours({f: self.firewall.rendered(self._rules(), f) for f in (4, 6)}
                   if not self._rules_stale else None)

    def _lock_instance(self, stack: contextlib.ExitStack) -> None:
        # Host-wide, whatever --runtime-dir says: the chain and the queue numbers are too.
        path = INSTANCE_LOCK
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        stack.callback(os.close, fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DaemonError(f"another egress-monitor is already running (pid {other}, "
                              f"lock {path}); stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def _signals(self, wake: socket.socket) -> None:
        wake.setblocking(False)
        signal.set_wakeup_fd(wake.fileno())

        def stop(_sig: int, _frame: Any) -> None:
            self._stopping = True

        def reload(_sig: int, _frame: Any) -> None:
            self._reload = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    @staticmethod
    def _read_acct() -> str | None:
        """The accounting switch now; None while nf_conntrack is not loaded (fresh boot)."""
        try:
            with open(CONNTRACK_ACCT) as f:
                return f.read().strip()
        except OSError:
            return None

    def _enable_conntrack_acct(self, seen: str | None) -> None:
        """Per-flow byte counters (upload alerts; connbytes) once our rules have loaded
        nf_conntrack. ``seen`` is the switch before the rules: connbytes forces it on, so
        with the module only just loaded its default (the module parameter) is what to
        restore at a clean stop."""
        try:
            try:
                with open(ACCT_BEFORE) as f:
                    self._acct_before = f.read().strip()
            except FileNotFoundError:
                if seen is None:
                    seen = "0"
                    with contextlib.suppress(OSError), \
                            open("/sys/module/nf_conntrack/parameters/acct") as f:
                        seen = "1" if f.read().strip() in ("1", "Y") else "0"
                self._acct_before = seen
                with open(ACCT_BEFORE, "w") as f:
                    f.write(self._acct_before)
            if self._read_acct() != "1":
                with open(CONNTRACK_ACCT, "w") as f:
                    f.write("1")
        except OSError as exc:
            log.warning("cannot enable conntrack accounting (%s): upload alerts will not see "
                        "builds' byte counts", exc)

    def _leftover_rules(self) -> list[BuildRule]:
        """Rules for the build cgroups a previous daemon left that still hold processes."""
        rules = []
        for rel in self.cgroups.build_cgroups():
            parsed = parse_build_cgroup(rel)
            if parsed is not None and self.cgroups.populated(rel):
                rules.append(BuildRule(rel, parsed[0]))
        return rules

    def _teardown(self) -> None:
        """Give back what the daemon made; builds still running stay refused (closed).

        Each step alone: one failure must not leave the others' state behind. Whatever the
        reason for the exit, a running build keeps its cgroup and gets refusing rules, so
        nothing it sends leaves unjudged until a daemon adopts it (or ``cleanup`` releases it).
        """
        running = [b for b in self.registry.active()
                   if b.cgroup and self._populated(b.cgroup)]
        refused = {b.cgroup: BuildRule(b.cgroup, b.queue) for b in running if b.cgroup}
        try:
            # Also the build cgroups this daemon never adopted (a start that failed half-way,
            # a queue number outside the range): whoever made them, they stay closed.
            for rule in self._leftover_rules():
                refused.setdefault(rule.cgroup, rule)
        except Exception:
            log.exception("listing build cgroups at exit")
        try:
            if refused:
                self.firewall.sync(list(refused.values()), refuse=True)
                log.warning("%d build(s) still running stay refused until a daemon adopts "
                            "them, or `egress-monitor cleanup` releases them: %s",
                            len(refused), ", ".join(sorted(refused)))
            else:
                self.firewall.remove()
        except Exception:
            log.exception("firewall teardown (%s)", "refusing" if refused else "removing")
        if self._acct_before is not None:
            try:
                if self._acct_before != "1":
                    with open(CONNTRACK_ACCT, "w") as f:
                        f.write(self._acct_before)
                os.unlink(ACCT_BEFORE)
            except OSError:
                log.exception("restoring %s", CONNTRACK_ACCT)
        try:
            self.queue.close()
        except Exception:
            log.exception("closing the queue socket")
        keep = set(refused)
        for build in self.registry.active():
            if build.cgroup and build.cgroup not in keep:
                try:
                    self.cgroups.release(build.cgroup)
                except Exception:
                    log.exception("releasing cgroup %s", build.cgroup)

    def _populated(self, rel: str) -> bool:
        try:
            return self.cgroups.populated(rel)
        except Exception:
            return True  # cannot tell: keep it refused, never open it

    def _close_control(self) -> None:
        self.control.close()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.config.runtime_dir, control.SOCKET_NAME))

    # -- the loop --------------------------------------------------------------------------
    def _loop(self, wake: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.fileno(), selectors.EVENT_READ, "proc")
        sel.register(self.queue.fileno(), selectors.EVENT_READ, "queue")
        sel.register(self.mailbox.fileno(), selectors.EVENT_READ, "mailbox")
        sel.register(self.control, selectors.EVENT_READ, "control")
        sel.register(wake, selectors.EVENT_READ, "wake")
        if self.creds.source is not None:
            sel.register(self.creds.source.fileno(), selectors.EVENT_READ, "creds")
        self._sel = sel
        if self._launch.source is not None:
            sel.register(self._launch.source.fileno(), selectors.EVENT_READ, "cgroups")
        for fd, nsg in (self.netns_gates.by_queue_fd.items() if self.netns_gates else ()):
            sel.register(fd, selectors.EVENT_READ, ("gate", nsg.inode))
        next_tick = next_reconcile = next_ping = next_uploads = 0.0
        ping = self.notifier.watchdog_interval_s
        run = self.isolation.run
        while not self._stopping:
            ready = {key.data for key, _ in sel.select(timeout=TICK_S)}
            if "wake" in ready:
                with contextlib.suppress(BlockingIOError):
                    wake.recv(64)
            # Each step isolates its own events; this outer guard only keeps the loop alive.
            run("loop", self._drain_proc)
            run("loop", self._finish_ends)
            if "creds" in ready:  # the opener waits: answered before anything else
                run("credential", self.creds.handle)
            if "queue" in ready:
                run("loop", self._drain_queue)
                run("loop", self._finish_ends)
            for item in ready:
                if isinstance(item, tuple):  # a gate's queue socket in another namespace
                    run("loop", functools.partial(self.gates.drain, item[1]))
            if "cgroups" in ready:
                run("loop", self._launch.changes)
            if "mailbox" in ready:
                run("loop", self.mailbox.run_pending)
            if "control" in ready:
                run("control", self._accept_control)
            if self._reload:
                self._reload = False
                run("reload", self._reload_policy)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                run("tick", self._tick)
            if now >= next_uploads and self.exfil.uploads:
                next_uploads = now + UPLOAD_POLL_S
                run("uploads", self.exfil.check_uploads)
            if ping is not None and now >= next_ping:
                # From the loop itself: a wedged loop stops the pings and systemd restarts us.
                next_ping = now + ping
                self.notifier.notify("WATCHDOG=1")
            if now >= next_reconcile:
                next_reconcile = now + RECONCILE_S
                run("reconcile", self._reconcile)
        self._sel = None
        sel.close()

    def _drain_proc(self) -> None:
        for ev in self.proc.read():
            self.isolation.run("proc_event", functools.partial(self._proc_event, ev))

    def _proc_event(self, ev: ProcFork | ProcExec | ProcExit | ProcEventsLost | ProcUid
                    | ProcPtrace) -> None:
        if isinstance(ev, ProcFork):
            self.metrics.proc_events.labels("fork").inc()
            self._apply(self.tree.on_fork(ev))
        elif isinstance(ev, ProcExec):
            self.metrics.proc_events.labels("exec").inc()
            self._apply(self.tree.on_exec(ev))
            self.engines.on_exec(ev.pid)
            self.gates.at_exec(ev.pid, ev.ts_ns)
            self._learn_secrets(ev.pid)
            if self.indicators.crates:
                self._check_known_bad(ev.pid)
        elif isinstance(ev, ProcExit):
            self.metrics.proc_events.labels("exit").inc()
            self._apply(self.tree.on_exit(ev))
            self._launch.watch.exited(ev.pid, ev.ts_ns)
            node = self.tree.get(ev.pid)
            if self.bpf is not None and node is not None and node.build is not None:
                # Read at its exec; keep the LRU for the living. Only members have records:
                # the host's other exits cost nothing here.
                self.bpf.forget_exec(ev.pid)
                self.in_kernel.forget_ahead(node.build, ev.pid)
        elif isinstance(ev, ProcUid):
            self.metrics.proc_events.labels("uid").inc()
            self.tamper.on_uid(ev)
        elif isinstance(ev, ProcPtrace):
            self.metrics.proc_events.labels("ptrace").inc()
            self.tamper.on_ptrace(ev)
        elif isinstance(ev, ProcEventsLost):
            self.metrics.proc_events_lost.inc()
            log.warning("kernel dropped proc events; resynchronising from /proc")
            self._apply(self.tree.resync(self._snapshot(), self._clock()))

    def _learn_secrets(self, pid: int, created: bool = False) -> None:
        """Fingerprint the secrets in a build member's environment (exfil.learn_secrets);
        for a new build's root, also watch the credential files under its $HOME."""
        node = self.tree.get(pid)
        if node is not None and node.build is not None:
            environ = self.procfs.environ(pid)
            self.exfil.learn_secrets(node.build, environ, rules_for(
                self.policy.secret_names, self.policy.secret_ignore))
            if created:
                self.creds.build_started(node.build, environ)

    def _check_known_bad(self, pid: int) -> None:
        """A build compiling or running a listed crate (known_bad.py): alert, or end it."""
        node = self.tree.get(pid)
        hit = self.known_bad.check(node) if node is not None else None
        if hit is None or node is None or node.build is None or node.crate is None:
            return
        build = node.build
        action = self.policy.known_bad_crates
        killed = False
        if action == "kill-build" and self.mode == "enforce" and build.cgroup:
            try:
                self.cgroups.kill(build.cgroup)
                killed = True
                build.killed_by = "known_bad_crates"
            except OSError as exc:
                log.error("kill-build of %s failed: %s", build.id, exc)
        self.metrics.known_bad.inc()
        self._emit(raise_alert(
            wall=self._wall(), kind="known_bad_crate", severity="critical",
            rule="known_bad_crates", owner=node, build=build, blocked=killed,
            evidence={"crate": node.crate.name, "version": node.crate.version,
                      "stage": STAGE[attribution.role_of(node)],
                      "why": hit.why, "indicator_source": hit.source, "action": action,
                      "build_killed": killed}))

    def _sunk_attempt(self, peer: tuple[str, int], dst: tuple[str, int] | None,
                      data: bytes) -> None:
        """From the sinkhole thread: hand what a refused connection sent to the main loop."""
        self.mailbox.post("sinkhole", lambda: self.exfil.sunk_attempt(peer, dst, data))

    def _tick(self) -> None:
        self.exfil.expire_sunk()
        self.gates.seen_netns()
        if self.bpf is not None:
            stats = self.bpf.stats()
            for name, value in stats.items():
                self.metrics.bpf_events.labels(name).set(value)
            forged = stats.get("mark_forged", 0) + stats.get("mark_refused", 0)
            if forged > self._bpf_forged:
                # A build process set our stamp on its socket (refused, or its packets
                # dropped in the kernel): someone impersonating another process.
                self._bpf_forged = forged
                self._emit(raise_alert(
                    wall=self._wall(), kind="tamper", severity="critical", rule="tamper",
                    blocked=True, actor=nobody(),
                    evidence={"tamper": "stamp", "mark_forged": stats.get("mark_forged", 0),
                              "mark_refused": stats.get("mark_refused", 0)}))
            reused = stats.get("flow_reused", 0)
            if reused > self._bpf_reused:
                # A build process sent on ports another process's judged flow holds (its
                # packets were dropped in the kernel): a way around the queue, tried.
                self._bpf_reused = reused
                self._emit(raise_alert(
                    wall=self._wall(), kind="tamper", severity="critical", rule="tamper",
                    blocked=True, actor=nobody(),
                    evidence={"tamper": "flow_reuse", "flow_reused": reused}))
            lost = stats.get("fork_lost", 0) + stats.get("exec_lost", 0)
            if lost > self._bpf_lost:
                log.error("the kernel could not record %d fork/exec event(s) of build "
                          "members (members map full?): their processes are not stamped",
                          lost - self._bpf_lost)
                self._bpf_lost = lost
        self.engines.tick()
        self._launch.tick()
        if self._stamp() != self._policy_stamp:
            self._reload_policy()
        self.tree.prune(self._clock())
        self.knowledge.expire(self._clock())
        for rel in [r for r in self._stranded if not self.cgroups.populated(r)]:
            del self._stranded[rel]
            with contextlib.suppress(OSError):
                self.cgroups.remove(rel)
            self._rules_stale = True
        if self._rules_stale:
            self._sync_rules()
        for build in self.registry.active():
            if build.cgroup and not self.cgroups.populated(build.cgroup) \
                    and not self._launch.holds(build):  # its containers still run
                self._ending.append(build)
        self._finish_ends()

    def _reconcile(self) -> None:
        """Every second: tamper checks (our rules compared by content and put back, members
        outside their cgroup, packet sockets); without the rule guard, the jumps' presence."""
        self.tamper.check()
        self.in_kernel.check_programs()
        self.in_kernel.renew_ahead()
        self.in_kernel.check_ahead()
        if self.tamper.rules is not None or self.firewall.present():
            return
        log.error("the %s chain or its jump was removed; reinstalling", self.firewall.chain)
        try:
            self.firewall.install(self._rules())  # never through an empty chain
        except FirewallError as exc:
            log.error("reinstalling firewall rules failed: %s", exc)

    def _stamp(self) -> tuple[tuple[str, int, int], ...]:
        """What the policy files look like on disk (path, mtime, size), to notice edits."""
        if not self.config.policy_path:
            return ()
        paths = [self.config.policy_path]
        if self.config.policy_dir:
            paths += dropin_files(self.config.policy_dir)
        out = []
        for p in paths:
            try:
                st = os.stat(p)
                out.append((p, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((p, 0, -1))
        return tuple(out)

    def _reload_policy(self) -> None:
        """Load the policy again; a policy that fails keeps the running one in force."""
        self._policy_stamp = self._stamp()
        if not self.config.policy_path:
            return
        self.notifier.notify("RELOADING=1")
        try:
            policy = load_policy(self.config.policy_path, self.config.policy_dir)
        except PolicyError as exc:
            self.notifier.notify("READY=1")
            self.metrics.policy_reloads.labels("rejected").inc()
            log.error("policy reload rejected, keeping the running policy (%s):\n%s",
                      self.policy.digest[:12], exc)
            self._emit(attribution.daemon_event(
                wall=self._wall(), state="reload_rejected", mode=self.mode,
                policy_digest=self.policy.digest, errors=[str(i) for i in exc.issues]))
            return
        log.info("policy reloaded from %s: %s", policy.source, describe(self.policy, policy))
        self.policy = policy
        for build in self.registry.active():  # what was allowed ahead was the old policy's
            self.in_kernel.forget_ahead(build)
        self.metrics.policy_reloads.labels("ok").inc()
        self.metrics.policy_info.info({"digest": policy.digest, "source": policy.source})
        for warning in policy.warnings:
            log.warning("policy: %s", warning)
        self.mode = self.config.mode or self.policy.mode
        self.metrics.set_mode(self.mode)
        self.notifier.notify("READY=1", f"STATUS=watching builds, mode {self.mode}")
        self._emit(attribution.daemon_event(wall=self._wall(), state="reload", mode=self.mode,
                                            policy_digest=self.policy.digest))

    # -- effects ---------------------------------------------------------------------------
    def _apply(self, effects: Iterable[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, BuildCreated):
                self._learn_secrets(effect.build.root.pid, created=True)  # before build_start
                self._enrol(effect.build)  # first: a failed placement must not skip it
                self._place(effect.build)
            elif isinstance(effect, BuildAnnounced):
                self.metrics.builds.inc()
                self._emit(attribution.build_start_event(wall=self._wall(),
                                                         build=effect.build))
            elif isinstance(effect, Joined):
                self._contain(effect.node, effect.build)
            elif isinstance(effect, MaybeEnded):
                build = effect.build
                if (build.cgroup is None or not self.cgroups.populated(build.cgroup)) \
                        and not self._launch.holds(build):
                    # Ended by the loop once every packet read so far is judged: a packet
                    # already read (and held) must still find its build.
                    self._ending.append(build)

    def _place(self, build: Build) -> None:
        """Give a new build its cgroup, queue and rule.

        Processes move first so that every socket they open from now on carries the build's
        cgroup; the rule follows (an iptables-restore, a few ms) and gates every new flow
        from then on.
        """
        name = build_cgroup_name(build.queue, build.id)
        parent = self.procfs.cgroup2(build.root.pid) or "/"
        if build_queue_of(parent) is not None:
            parent = "/"  # never nest a build inside another build's cgroup
        members = sorted(build.members, key=lambda n: n.started_ns)
        try:
            try:
                build.cgroup = self.cgroups.create(parent, name)
                self._move_all(build.cgroup, members)
            except OSError as exc:
                # cgroup v2's no-internal-process rule, or a delegation we may not write to:
                # fall back to a cgroup of our own at the top rather than leave it unwatched.
                log.warning("cannot nest build %s under %s (%s); placing it at the top",
                            build.id, parent, exc)
                with contextlib.suppress(OSError):
                    if build.cgroup:
                        self.cgroups.remove(build.cgroup)
                build.cgroup = None
                build.cgroup = self.cgroups.create("/", name)
                self._move_all(build.cgroup, members)
        finally:
            # Whatever failed above, a cgroup that exists gets its rule: an unbound queue
            # drops (closed), a missing rule would pass.
            if build.cgroup:
                try:
                    self.queue.bind_queue(build.queue)
                finally:
                    self._sync_rules()
        self.metrics.build_setup.observe(max(0, self._clock() - build.started_ns) / 1e9)

    def _move_all(self, rel: str, members: list[Node]) -> None:
        for node in members:
            if node.exited_ns is None:
                self.cgroups.move(rel, node.pid)

    def _rules(self) -> list[BuildRule]:
        return [BuildRule(b.cgroup, b.queue) for b in self.registry.active() if b.cgroup] \
            + list(self._stranded.values())

    def _sync_rules(self) -> None:
        self._rules_stale = True  # until a sync succeeds; the tick retries
        try:
            self.firewall.sync(self._rules())
            self._rules_stale = False
        except FirewallError as exc:
            log.error("cannot install build rules: %s", exc)
        self.gates.sync()

    def _contain(self, node: Node, build: Build) -> None:
        """Make sure a newly forked member is inside its build's cgroup.

        A child forked before its parent was moved stays in the old cgroup; the fork event
        cannot tell which side of the move it fell on, so the kernel is asked.
        """
        if build.cgroup is None or self._launch.of_node(node) is not None:
            return  # a container's process (engine_launch.py) stays in the container's
        current = self.procfs.cgroup2(node.pid)
        if current is None or current == build.cgroup or current.startswith(build.cgroup + "/"):
            return
        try:
            self.cgroups.move(build.cgroup, node.pid)
        except CgroupError as exc:
            log.warning("cannot move pid %d into build %s: %s", node.pid, build.id, exc)

    def _finish_ends(self) -> None:
        """End the builds found ended, each after judging every packet held so far (what
        the build sent before it ended). Not re-entered: ends found meanwhile join the
        list."""
        if self._ending_now:
            return
        self._ending_now = True
        try:
            while self._ending:
                build = self._ending.pop(0)
                self._drain_everything()  # its namespaces' too
                self.isolation.run("build_end", functools.partial(self._end, build))
        finally:
            self._ending_now = False

    def _end(self, build: Build) -> None:
        if build.ended_ns is not None:
            return
        now = self._clock()
        self.tree.end_build(build, now)
        self.exfil.forget_build(build)  # a last look at what its flows sent, then forget
        self.creds.build_ended(build)
        self.knowledge.forget_build(build.id)
        self.detector.forget_build(build.id)
        if self.bpf is not None:
            for key in build.verdict_keys:
                with contextlib.suppress(OSError):
                    self.bpf.revoke_flow(key)
        build.verdict_keys.clear()
        self.in_kernel.forget_ahead(build)
        self._sync_rules()
        with contextlib.suppress(OSError):
            self.queue.unbind_queue(build.queue)
        self.gates.release(build)
        if build.cgroup:
            try:
                if not self.cgroups.remove(build.cgroup):
                    log.warning("build %s ended but its cgroup %s is busy", build.id,
                                build.cgroup)
            except OSError as exc:
                log.warning("removing cgroup %s: %s", build.cgroup, exc)
        self._emit(attribution.build_end_event(wall=self._wall(), build=build, now_ns=now))

    # -- packets ---------------------------------------------------------------------------
    def _drain_queue(self, nsg: NetnsGate | None = None) -> int:
        """Judge the held packets waiting now (one read's worth); returns how many."""
        queue = self.queue if nsg is None or nsg.queue is None else nsg.queue
        packets = queue.read()
        if not packets:
            return 0
        # Read, each packet must get its verdict: nothing before the loop may stop it.
        self.isolation.run("loop", self._drain_proc)
        for packet in packets:
            self._held(packet, queue, nsg)
        return len(packets)

    def _held(self, packet: QueuedPacket, queue: QueueSocket | None = None,
              nsg: NetnsGate | None = None) -> None:
        """Judge one held packet in isolation: whatever fails, it gets exactly one verdict
        (on the socket it came from: the host's, or a namespace gate's), and a failure before
        that verdict refuses it."""
        sent: list[bool] = []
        source = queue or self.queue

        def verdict(v: int, mark: int | None = None) -> None:
            source.verdict(packet.queue, packet.packet_id, v, mark=mark)
            sent.append(True)  # after the send: a send that raised sent nothing

        def refuse() -> None:
            if not sent:
                verdict(NF_REPEAT, mark=DENY_MARK)

        def judge() -> None:  # the host's packets keep the two-argument call
            if nsg is None:
                self._decide(packet, verdict)
            else:
                self._decide(packet, verdict, nsg)

        self.isolation.run("packet", judge, fallback=refuse)

    def _creator(self, packet: QueuedPacket) -> Node | None:
        """The process whose socket sent this packet, from the kernel's stamp (exact, even
        after the socket closed or the process exited); None without a stamp."""
        if self.bpf is None or packet.mark is None:
            return None
        tgid = self.layout.creator(packet.mark)
        return self.tree.get(tgid) if tgid else None

    def _decide(self, packet: QueuedPacket, verdict: Callable[..., None],
                nsg: NetnsGate | None = None) -> None:
        creator = self._creator(packet)
        if packet.queue == self.config.mark_queue:
            # Stamped, and in no build cgroup (yet): the creator names the build.
            build = creator.build if creator is not None else None
            if build is None or build.ended_ns is not None:
                tgid = self.layout.creator(packet.mark or 0) or 0
                if build is None and self.bpf is not None and self.bpf.member(tgid) is None:
                    # Not a member: someone else's mark that happens to carry our bits. Not
                    # ours to touch; a member's socket without a verdict key is dropped by
                    # the backstop in any case.
                    verdict(NF_ACCEPT)
                    self.metrics.unattributed.labels("not_a_member").inc()
                    return
                # A member the tree has no live build for: its events are late, or its
                # build ended. Dropped (a TCP client retries its SYN), never passed.
                verdict(NF_DROP)
                self.metrics.unattributed.labels("unknown_member").inc()
                return
        else:
            build = self.registry.by_queue(packet.queue)
        try:
            flow = parse_flow(packet.payload)
        except MalformedPacket as exc:
            verdict(NF_DROP)
            self.metrics.unattributed.labels("malformed").inc()
            log.warning("dropped a malformed packet from queue %d: %s", packet.queue, exc)
            return
        if build is None:
            # The build ended while its packet waited: there is nobody left to judge for.
            verdict(NF_DROP)
            self.metrics.unattributed.labels("no_build").inc()
            return
        if flow.protocol is Protocol.TCP:
            base = self._reset_flows.get((flow.src, flow.src_port, flow.dst, flow.dst_port))
            seq = tcp_seq(packet.payload) if base is not None else None
            if base is not None and seq is not None and same_connection(base, seq) \
                    and not is_tcp_syn(packet.payload):
                verdict(NF_REPEAT, mark=DENY_MARK)
                return
            refuse_data = self.exfil.first_data(
                flow, packet.payload, lambda s: self._subject(s.owner, s.build), self.policy,
                self.mode == "enforce")
            if refuse_data is not None:
                verdict(NF_REPEAT if refuse_data else NF_ACCEPT,
                        mark=DENY_MARK if refuse_data else None)
                return
        by_stamp = creator is not None and creator.build is build
        owner = creator if by_stamp else self.owners.of_flow(flow, build)
        if owner is not None:
            self.in_kernel.hold(owner)
        names = self.knowledge.names(build.id, flow.dst, self._clock())
        builtin = gate.builtin_refusal(flow.protocol, flow.dst_port)
        decision = builtin or decide(self.policy, self._subject(owner, build), ip=flow.dst,
                                     port=flow.dst_port, protocol=str(flow.protocol),
                                     names=names,
                                     same_build=self._listener_in_build(flow, build))
        judged = gate.judge(flow.protocol, self.mode, decision, builtin,
                            syn=flow.protocol is not Protocol.TCP or is_tcp_syn(packet.payload))
        if judged.outcome == "accept":
            # What the first packet itself carries: a secret in a first datagram, data in a
            # SYN (TCP Fast Open). The flow is recorded first, so its SYN data has a table.
            content = None
            if flow.protocol is Protocol.UDP and self.exfil.first_datagram(
                    flow, packet.payload, owner, build, names, self.mode == "enforce"):
                content = "secret-value"
            elif flow.protocol is Protocol.TCP:
                self.exfil.accepted(flow, owner, build, names)
                if self.exfil.syn_data(flow, packet.payload, lambda s: self._subject(
                        s.owner, s.build), self.policy, self.mode == "enforce"):
                    content = "first-data"
            if content is not None:
                judged = gate.content_refusal(decision, content)
        if judged.outcome == "sinkhole":
            self.exfil.sinking(flow, owner, build, names, decision.rule)
        if judged.outcome == "accept":  # before the accept: the backstop reads it
            self.in_kernel.allow(flow, build, creator.pid if by_stamp and creator else None)
        verdict(NF_ACCEPT if judged.outcome == "accept" else NF_REPEAT, mark=judged.mark)
        if by_stamp and judged.outcome == "accept" and decision.action == "allow" \
                and builtin is None:
            self.in_kernel.send_ahead(flow, build, creator)
        elif judged.outcome == "reset" and flow.protocol is Protocol.TCP \
                and not is_tcp_syn(packet.payload) \
                and (seq := tcp_seq(packet.payload)) is not None:
            self._reset_flows[(flow.src, flow.src_port, flow.dst, flow.dst_port)] = seq
            while len(self._reset_flows) > MAX_RESET_FLOWS:
                self._reset_flows.popitem(last=False)
        if judged.outcome == "accept" and flow.protocol is not Protocol.TCP:
            self.exfil.accepted(flow, owner, build, names)
        self.metrics.verdict_latency.observe((time.monotonic_ns() - packet.received_ns) / 1e9)
        killed = False
        if judged.kill_build and build.cgroup:
            try:
                self.cgroups.kill(build.cgroup)
                killed = True
                build.killed_by = decision.rule
            except OSError as exc:
                log.error("kill-build of %s failed: %s", build.id, exc)
        if owner is None:
            self.metrics.unattributed.labels("owner_gone").inc()
        applied = "deny" if judged.refused else "allow"
        record = attribution.connection_event(wall=self._wall(), flow=flow, owner=owner,
                                              build=build, decision=applied, mode=self.mode,
                                              names=names, reason=judged.reason)
        record["policy_decision"] = decision.action
        record["rule"] = decision.rule
        record["identity"] = "kernel" if by_stamp else "scan"
        if packet.mark is not None and packet.mark & self.layout.fast and by_stamp:
            record["syn_ahead"] = True  # its SYN left at once; this judged its next packet
        self._where(record, build, nsg)
        if owner is not None and owner.basis:
            record["role_basis"] = owner.basis
        if decision.action == "kill-build":
            record["build_killed"] = killed
        self.metrics.policy_decisions.labels(record["role"], decision.action,
                                             decision.rule).inc()
        if applied == "allow" and decision.action in ("deny", "kill-build"):
            self.metrics.would_be_denied.labels(record["role"]).inc()
        build.record_connection(record["role"], applied, decision.action)
        self.metrics.connections.labels(record["role"], applied, record["protocol"]).inc()
        self._emit(record)
        if decision.action == "alert":
            self._emit(connection_alert(wall=self._wall(), connection=record,
                                        kind="policy_alert", severity="warning"))
        elif judged.blocked_alert:
            self._emit(connection_alert(wall=self._wall(), connection=record,
                                        kind="blocked_attempt", severity="critical"))

    def _dns_owner(self, client: tuple[str, int],
                   transport: str) -> tuple[Node | None, Build | None]:
        self._drain_proc()  # a process forked a moment ago is already in the tree
        found = self.owners.of_dns_client(client, transport, self.registry.active())
        if found[0] is None:
            found = self.gates.dns_owner(client, transport)
        return found

    def _listener_in_build(self, flow: FlowKey, build: Build) -> bool:
        """Under ``loopback: same-build``, whether a loopback flow goes to its own build."""
        if self.policy.loopback != "same-build" or not is_loopback(flow.dst) \
                or flow.protocol not in (Protocol.TCP, Protocol.UDP):
            return False
        return self.owners.listener_in_build(str(flow.protocol), flow.dst, flow.dst_port,
                                             build)

    # -- control ---------------------------------------------------------------------------
    def _accept_control(self) -> None:
        try:
            conn, _ = self.control.accept()
        except BlockingIOError:
            return
        with conn:
            try:
                request = control.read_request(conn)
                control.send(conn, self._handle(request, control.peer_pid(conn)))
            except (ValueError, OSError, NoQueueSlot) as exc:
                with contextlib.suppress(OSError):
                    control.send(conn, {"ok": False, "error": str(exc)})

    def _handle(self, request: dict[str, Any], pid: int) -> dict[str, Any]:
        op = request["op"]
        if op == "exec":
            self._drain_proc()
            info = self.procfs.info(pid)
            build, effects = self.tree.adopt(pid, self.procfs.ppid(pid) or 0, self._clock(),
                                             info)
            self._apply(effects)
            self._enrol(build)  # before the answer: the caller execs CMD right after it
            return {"ok": True, "build": build.id, "cgroup": build.cgroup}
        if op == "status":
            now_ns = self._clock()
            builds = [{**attribution.build_ref(b), "via": b.via,
                       "age_s": round((now_ns - b.started_ns) / 1e9, 1),
                       "processes": len(b.members), "connections": status.counts(b)}
                      for b in self.registry.active()]
            return {"ok": True, "pid": os.getpid(), "mode": self.mode,
                    "runner": self.config.runner_name, "events": self.config.events_path,
                    "uptime_s": round(self._wall() - self.started_wall, 1),
                    "policy": {"source": self.policy.source, "digest": self.policy.digest,
                               "rules": len(self.policy.rules)},
                    "builds": builds, "finished": list(self.outputs.last_builds),
                    "last_alerts": list(self.outputs.last_alerts),
                    "would_deny": list(self.outputs.last_would_deny)}
        return {"ok": False, "error": f"unknown op {op!r}"}

    # -- seed ------------------------------------------------------------------------------
    def _snapshot(self) -> list[Snapshot]:
        out = []
        for pid in self.procfs.pids():
            ppid = self.procfs.ppid(pid)
            if ppid is None:
                continue
            queue = build_queue_of(self.procfs.cgroup2(pid))
            info = self.procfs.info(pid, full=False)
            if queue is not None or starts_build(info):
                info = self.procfs.info(pid)
            out.append(Snapshot(pid, ppid, info, queue))
        return out

    def _adopt_and_seed(self) -> None:
        """Adopt builds a previous daemon left running, drop empty leftovers, seed the tree."""
        now = self._clock()
        adopted: list[tuple[str, list[int]]] = []
        for rel in self.cgroups.build_cgroups():
            parsed = parse_build_cgroup(rel)
            assert parsed is not None
            queue, build_id = parsed
            pids = sorted(self.cgroups.procs(rel))
            if not pids and not self.cgroups.populated(rel):
                self.cgroups.release(rel)
                continue
            if not pids or not self.config.queue_base <= queue < \
                    self.config.queue_base + self.config.max_builds:
                # Processes only in sub-cgroups, or a queue outside our range (the config
                # changed): never opened, refused until it empties or cleanup releases it.
                log.error("build cgroup %s cannot be adopted (queue %d, range %d-%d); its "
                          "processes stay refused until they end or `egress-monitor cleanup`",
                          rel, queue, self.config.queue_base,
                          self.config.queue_base + self.config.max_builds - 1)
                self._stranded[rel] = BuildRule(rel, queue, refuse=True)
                continue
            build = self.tree.restore(pids[0], now, self.procfs.info(pids[0]), queue=queue,
                                      build_id=build_id)
            build.cgroup = rel
            self.queue.bind_queue(queue)
            log.info("adopted build %s (%d processes) in %s", build_id, len(pids), rel)
            adopted.append((build_id, pids))
        self._sync_rules()
        self.gates.adopted(adopted)
        self._apply(self.tree.resync(self._snapshot(), now))
        for build in self.registry.active():
            self._enrol(build)  # adopted: the new maps know none of its processes

    # -- sinks -----------------------------------------------------------------------------
    def _emit(self, item: dict[str, Any] | Alert) -> None:
        item = self._located(item)
        if self.config.degraded:
            if isinstance(item, Alert):
                item = dataclasses.replace(item, actor={**item.actor,
                                                        "attribution": "degraded"})
            else:
                item = {**item, "attribution": "degraded"}
        self.outputs.emit(item)

    def _located(self, item: dict[str, Any] | Alert) -> dict[str, Any] | Alert:
        """DNS records and alerts say where their process ran (where.py); connection
        records have it already (``_where``)."""
        fields = item.actor if isinstance(item, Alert) else item
        if (not isinstance(item, Alert) and item.get("type") != "dns") or "netns" in fields:
            return item
        process, ref = fields.get("process"), fields.get("build")
        pid = process.get("pid") if isinstance(process, dict) else None
        build_id = ref.get("id") if isinstance(ref, dict) else None
        if not isinstance(pid, int):
            return item
        build = next((b for b in self.registry.active() if b.id == build_id), None)
        if self._own_netns is None:
            self._own_netns = self.netns_gates.own_inode if self.netns_gates is not None \
                else _own_netns_inode()
        inode = ns_inode(pid, self.config.proc_root)
        seen = self._where_seen.get((str(build_id), pid))
        if seen is not None and (isinstance(item, Alert) or inode is None):
            # An alert is about a flow judged before (the sinkhole's), or the process is gone
            return dataclasses.replace(item, actor={**item.actor, **seen}) \
                if isinstance(item, Alert) else {**item, **seen}
        launched = self._launch.of_node(self.tree.get(pid))
        found = launched.container if launched is not None else \
            _container_of(build.cgroup or "") if build is not None else None
        extra = where_fields(inode, self._own_netns, found,
                             launched.launched_by() if launched is not None else None)
        if not extra:
            return item
        if isinstance(item, Alert):
            return dataclasses.replace(item, actor={**item.actor, **extra})
        return {**item, **extra}

    def _enrol(self, build: Build) -> None:
        """Make a build's live processes members in the kernel (a build the kernel did not
        start itself: ``egress-monitor exec``, adoption, processes older than the daemon),
        so their new sockets are stamped and their forks followed from now on."""
        if self.bpf is None or self.bpf.member(build.root.pid) is not None:
            return  # the kernel started it: its members are the kernel's own
        for node in list(build.members):
            if node.exited_ns is not None or self.procfs.ppid(node.pid) is None:
                continue  # gone: a reused pid must never become a member
            # Crate code and anything of unknown role stays crate code in the kernel; only
            # the exec launcher itself may still become cargo.
            launcher = node is build.root and build.via == "exec"
            code = _KERNEL_ROLE.get(str(node.role), bpf_programs.ROLE_NONE if launcher
                                    else bpf_programs.ROLE_CRATE)
            self.bpf.set_member(node.pid, bpf_programs.member_value(build.queue, code),
                                only_new=True)

    # -- other network namespaces (docs/netns.md) ------------------------------------------
    def _drain_everything(self) -> None:
        """Judge every packet held now, on the host's queue and every gate's, until none is
        left (bounded: other builds may keep sending). A build ends only after this: what it
        sent before it ended is judged and recorded, not dropped as a late packet. A burst of
        SYNs sent ahead (bpf/fast.py) can leave thousands of ACKs waiting."""
        deadline = time.monotonic() + END_DRAIN_S
        while time.monotonic() < deadline:
            host = self.isolation.run("loop", self._drain_queue)
            gates = self.isolation.run("loop", self.gates.drain_all)
            if not host and not gates:  # nothing left (or a failure, reported: stop)
                return

    @property
    def netns_gates(self) -> NetnsGates | None:
        """The gates in other network namespaces (gate_wiring.py); None before the start."""
        return self.gates.gates

    def _where(self, record: dict[str, Any], build: Build, nsg: NetnsGate | None) -> None:
        """A connection record says which network namespace (inode) it came from, when not
        the daemon's, and the container its build's cgroup path names, if any."""
        if nsg is not None:
            record["netns"] = nsg.inode
        found = _container_of(build.cgroup or "")
        launched = self._launch.of_record(record)
        if launched is not None:  # a container an engine started for the build
            found = launched.container
            record["launched_by"] = launched.launched_by()
        if found is not None:
            record["container"] = {"runtime": found.runtime, "id": found.id, "pod": found.pod}
        process = record.get("process")
        if isinstance(process, dict) and isinstance(process.get("pid"), int):
            # For the records written later about this process (the sinkhole's, after it
            # may have exited): where it was when its flow was judged.
            seen: dict[str, Any] = {
                k: record[k] for k in ("netns", "container", "launched_by") if k in record}
            self._where_seen[(build.id, process["pid"])] = seen
            while len(self._where_seen) > 4096:
                self._where_seen.popitem(last=False)

    def _runs_in(self, owner: Node | None, build: Build) -> tuple[str | None, str | None]:
        """Where a decision's process runs, for policy (``container``, ``netns`` rule keys):
        the runtime of the container its build's cgroup path names (as ``_where`` reports
        it), and "host" or "other" by its ``/proc/PID/ns/net`` (one stat, and only when some
        rule matches on ``netns``; None when the process is gone or no process is known: a
        netns rule then does not match)."""
        found = _container_of(build.cgroup or "")
        launched = self._launch.of_node(owner)
        found = launched.container if launched is not None else found
        runtime = found.runtime if found is not None else None
        if owner is None or not any(r.netns for r in self.policy.rules):
            return runtime, None
        if self._own_netns is None:
            self._own_netns = self.netns_gates.own_inode if self.netns_gates is not None \
                else _own_netns_inode()
        inode = ns_inode(owner.pid, self.config.proc_root)
        netns = None if inode is None or self._own_netns is None else \
            "host" if inode == self._own_netns else "other"
        return runtime, netns

# A build's cgroup path changes only when it is placed: its container, parsed once per path.
_container_of = functools.lru_cache(maxsize=1024)(container_of)


def _own_netns_inode() -> int | None:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None
