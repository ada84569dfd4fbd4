"""The frozen, validated form of a policy (pure): ``loader.py`` builds it, ``engine.py``
reads it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from egress_monitor.policy.names import NamePattern
from egress_monitor.policy.semver import VersionReq

Mode = Literal["audit", "enforce"]
MODES: tuple[Mode, ...] = ("audit", "enforce")
Action = Literal["allow", "deny", "alert", "kill-build"]
ACTIONS: tuple[Action, ...] = ("allow", "deny", "alert", "kill-build")
ROLES = ("cargo", "rustc", "build-script", "crate-binary", "other")
PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6")
# Where a build runs (rule keys ``container`` and ``netns``): the container runtimes
# containers.py recognises, plus any (in some container) and none (in none)
RUNTIMES = ("docker", "podman", "containerd", "crio", "kubernetes")
CONTAINERS = ("any", "none", *RUNTIMES)
NETNS = ("host", "other")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a flow may go: names and/or networks, optionally narrowed by ports and protocols.

    With neither ``hosts`` nor ``cidrs`` any address matches. Ports and protocols narrow
    further when given.
    """

    label: str  # the group name, or "inline"
    hosts: tuple[NamePattern, ...] = ()
    cidrs: tuple[Network, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()
    protocols: frozenset[str] = frozenset()

    def matches(self, ip: str | None, port: int | None, protocol: str | None,
                names: tuple[str, ...]) -> bool:
        """Whether a flow to ``ip:port/protocol``, known by ``names``, goes here."""
        if self.protocols and protocol not in self.protocols:
            return False
        if self.ports and (port is None or not any(lo <= port <= hi for lo, hi in self.ports)):
            return False
        if not self.hosts and not self.cidrs:
            return True
        if any(p.matches(n) for p in self.hosts for n in names):
            return True
        if ip is not None and self.cidrs:
            addr = ipaddress.ip_address(ip)
            return any(addr.version == net.version and addr in net for net in self.cidrs)
        return False

    def matches_name(self, name: str) -> bool:
        """Whether resolving ``name`` can lead here (a CIDR-only destination never does)."""
        if not self.hosts and not self.cidrs:
            return True
        return any(p.matches(name) for p in self.hosts)


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule; every condition given must hold (absent ones always do)."""

    id: str
    action: Action
    where: str  # "file:line", for messages
    roles: frozenset[str] | None = None
    crate: str | None = None  # normalised: '-' as '_'
    version: VersionReq | None = None
    exe: str | None = None  # glob
    ancestor: str | None = None  # glob on any ancestor's exe within the build
    root: str | None = None  # glob on the build's root exe
    # Where it runs: the container its build's cgroup path claims (CONTAINERS) and whether its
    # network namespace is the daemon's ("host") or another ("other"). A container is a claim
    # (cgroup names below a delegation are the delegate's choice): see docs/policy.md.
    container: str | None = None
    netns: str | None = None
    to: tuple[Destination, ...] | None = None  # None: any destination
    to_labels: tuple[str, ...] = ()  # as written, for explanations and shadow checks


# Under a build's $HOME: a trailing '/' is a directory and everything below it.
DEFAULT_CREDENTIAL_PATHS = (
    ".ssh/", ".aws/", ".config/gcloud/", ".azure/", ".kube/config", ".docker/config.json",
    ".netrc", ".git-credentials", ".cargo/credentials.toml", ".cargo/credentials")


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy: ``digest`` is the SHA-256 over every file's bytes, in load order."""

    mode: Mode
    version: int
    source: str
    digest: str
    # allow: every loopback destination; same-build: a listener of the flow's own build
    # (a test's own server); policy: judged like any other destination
    loopback: Literal["allow", "same-build", "policy"] = "same-build"
    defaults: dict[str, Action] = field(default_factory=lambda: dict.fromkeys(ROLES, "deny"))
    rules: tuple[Rule, ...] = ()
    warnings: tuple[str, ...] = ()
    known_bad_crates: Literal["alert", "kill-build"] = "alert"
    # A build reaching a container engine's socket or running its CLI (engines.py)
    container_engine: Literal["alert", "deny", "kill-build"] = "alert"
    # Credential files under a build's $HOME that build code may not read (credential_reads),
    # and crates excepted from that
    credential_paths: tuple[str, ...] = DEFAULT_CREDENTIAL_PATHS
    credential_except_crates: frozenset[str] = frozenset()
    # Environment variables that are (secret_names) or are never (secret_ignore) secrets,
    # beyond the built-in rules of detect/secrets.py
    secret_names: frozenset[str] = frozenset()
    secret_ignore: frozenset[str] = frozenset()
