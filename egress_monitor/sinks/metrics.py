"""Prometheus metrics, on a registry the caller owns (no global state in library code).

Label values come only from closed sets (role, decision, protocol, event kind, reason), so a
runner's series count stays bounded whatever its builds do.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from egress_monitor import __version__

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 1.0)


class Metrics:
    """Every metric the daemon exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connections = Counter(
            "egress_monitor_connections", "New outbound flows from builds, by verdict.",
            ["role", "decision", "protocol"], registry=registry)
        self.builds = Counter(
            "egress_monitor_builds", "Builds started since the daemon started.",
            registry=registry)
        self.builds_active = Gauge(
            "egress_monitor_builds_active", "Builds running now.", registry=registry)
        self.verdict_latency = Histogram(
            "egress_monitor_verdict_latency_seconds",
            "Time from a held packet reaching the daemon to its verdict.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.build_setup = Histogram(
            "egress_monitor_build_setup_seconds",
            "From the exec that started a build (kernel timestamp) to its cgroup, queue and "
            "rule being in place: the window in which a detected build is not yet gated.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.proc_events = Counter(
            "egress_monitor_proc_events", "Proc connector events handled.", ["kind"],
            registry=registry)
        self.proc_events_lost = Counter(
            "egress_monitor_proc_events_lost",
            "Times the kernel reported lost proc events (each triggers a resync from /proc).",
            registry=registry)
        self.unattributed = Counter(
            "egress_monitor_unattributed_packets",
            "Held packets whose owning process could not be named.", ["reason"],
            registry=registry)
        self.bpf_events = Gauge(
            "egress_monitor_bpf_events",
            "The kernel programs' own counters (docs/bpf.md: forks followed and lost, execs, "
            "sockets stamped, packets the backstop dropped, ...), read every tick.", ["counter"],
            registry=registry)
        self.sink_failures = Counter(
            "egress_monitor_sink_failures", "Failed writes to an event sink.", ["sink"],
            registry=registry)
        self.tracked_processes = Gauge(
            "egress_monitor_tracked_processes", "Processes in the daemon's process tree.",
            registry=registry)
        self.dns_queries = Counter(
            "egress_monitor_dns_queries", "DNS queries from builds, by the answer given.",
            ["role", "qtype", "decision"], registry=registry)
        self.dns_upstream_latency = Histogram(
            "egress_monitor_dns_upstream_latency_seconds",
            "Time to an upstream resolver's answer (or to giving up on every upstream).",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.dns_upstream_failures = Counter(
            "egress_monitor_dns_upstream_failures", "Upstream resolvers that did not answer.",
            registry=registry)
        self.dns_unattributed = Counter(
            "egress_monitor_dns_unattributed",
            "Queries at the builds' resolver whose sender could not be found (its socket was "
            "already closed): refused, never forwarded.", registry=registry)
        self.dns_malformed = Counter(
            "egress_monitor_dns_malformed", "DNS messages that could not be parsed (queries "
            "get FORMERR).", registry=registry)
        self.engine_containers = Counter(
            "egress_monitor_engine_containers",
            "Container cgroups that appeared while a build talked to an engine, by outcome: "
            "tied (made part of the one build), ambiguous (several builds: tied to none).",
            ["outcome"], registry=registry)
        self.dns_tunnels = Counter(
            "egress_monitor_dns_tunnel_detections", "Tunnel-shaped query patterns, by role.",
            ["role"], registry=registry)
        self.dns_knowledge = Gauge(
            "egress_monitor_dns_knowledge_entries",
            "Name-to-address facts held for builds (expire with TTL + overlap).",
            registry=registry)
        self.exfil_attempts = Counter(
            "egress_monitor_exfil_attempts",
            "Attempts by a build to send data off the host that raised an alert, by kind "
            "(blocked_attempt, policy_alert, dns_tunnel, known_bad_crate) and role.",
            ["kind", "role"], registry=registry)
        self.alert_delivery_failures = Counter(
            "egress_monitor_alert_delivery_failures",
            "Failed deliveries to Alertmanager (each is retried).", registry=registry)
        self.alerts_dropped = Counter(
            "egress_monitor_alerts_dropped",
            "Alerts not queued for Alertmanager because the queue was full.", registry=registry)
        self.known_bad = Counter(
            "egress_monitor_known_bad_crates",
            "Crates on the indicator list compiled or run in builds (rustc, build "
            "scripts, crate binaries).", registry=registry)
        self.policy_decisions = Counter(
            "egress_monitor_policy_decisions", "What the policy said of new flows (audit "
            "mode included), by role, action and rule id.", ["role", "action", "rule"],
            registry=registry)
        self.would_be_denied = Counter(
            "egress_monitor_would_be_denied", "Connections let through that the policy "
            "refuses (audit mode): what enforce mode would break, by role.", ["role"],
            registry=registry)
        self.policy_reloads = Counter(
            "egress_monitor_policy_reloads", "Policy reloads by result (ok, rejected).",
            ["result"], registry=registry)
        self.internal_errors = Counter(
            "egress_monitor_internal_errors",
            "Unexpected exceptions handled in isolation, by where they happened (each one "
            "refused the packet it concerned).", ["where"], registry=registry)
        self.policy_info = Info("egress_monitor_policy", "The policy in force.",
                                registry=registry)
        self.info = Info("egress_monitor", "Daemon build and mode.", registry=registry)
        self.info.info({"version": __version__})

    def set_mode(self, mode: str) -> None:
        """Record the enforcement mode on the info metric."""
        self.info.info({"version": __version__, "mode": mode})

    def track(self, tracked: Callable[[], int], active: Callable[[], int],
              knowledge: Callable[[], int]) -> None:
        """Compute the state gauges at scrape time from the daemon's own state."""
        self.tracked_processes.set_function(tracked)
        self.builds_active.set_function(active)
        self.dns_knowledge.set_function(knowledge)
