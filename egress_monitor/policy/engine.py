"""Decide on a connection or a name (pure).

Precedence, in one sentence (the same in docs/policy.md): rules are tried in order, the main
file's then each drop-in's by file name, and the first rule whose every condition holds
decides; when none does, the default of the process's role decides, except that loopback
destinations are allowed first when the policy says ``loopback: allow``, or, with
``loopback: same-build`` (the default), when the listener belongs to the flow's own build.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from egress_monitor.policy.schema import Action, Destination, Policy, Rule

_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True, slots=True)
class Subject:
    """The process a decision is about."""

    role: str
    crate: str | None = None
    version: str | None = None
    exe: str | None = None
    ancestors: tuple[str, ...] = ()  # exes of the build's processes above it
    root_exe: str | None = None
    # Where it runs: the runtime of the container its build's cgroup path names (None: no
    # container), and the network namespace ("host": the daemon's, "other", None: unknown,
    # e.g. the process is gone; a rule keyed on netns never matches an unknown one)
    container: str | None = None
    netns: str | None = "host"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy says and which rule said it (``rule`` is an id, ``default:<role>`` or
    ``loopback``); ``why`` is one line for people."""

    action: Action
    rule: str
    why: str


def _glob(pattern: str | None, value: str | None) -> bool:
    return pattern is None or (value is not None and fnmatch.fnmatchcase(value, pattern))


def subject_matches(rule: Rule, s: Subject) -> bool:
    """Whether every process condition of the rule holds for the subject."""
    if rule.roles is not None and s.role not in rule.roles:
        return False
    if rule.crate is not None:
        if s.crate is None or s.crate.replace("-", "_") != rule.crate:
            return False
        if rule.version is not None and (s.version is None or
                                         not rule.version.matches(s.version)):
            return False
    if not _glob(rule.exe, s.exe) or not _glob(rule.root, s.root_exe):
        return False
    if not container_matches(rule.container, s.container):
        return False
    if rule.netns is not None and s.netns != rule.netns:
        return False
    return rule.ancestor is None or any(_glob(rule.ancestor, a) for a in s.ancestors)


def container_matches(wanted: str | None, runtime: str | None) -> bool:
    """Whether a rule's ``container`` condition (None: absent, ``any``, ``none`` or a runtime)
    holds for a process whose build claims the container runtime ``runtime`` (None: none)."""
    if wanted is None:
        return True
    if wanted == "any":
        return runtime is not None
    if wanted == "none":
        return runtime is None
    return runtime == wanted


def is_loopback(ip: str | None) -> bool:
    """Whether an address is in 127.0.0.0/8 or ::1."""
    if ip is None:
        return False
    addr = ipaddress.ip_address(ip)
    return any(addr.version == n.version and addr in n for n in _LOOPBACK)


def _first_rule(policy: Policy, s: Subject, reaches: Callable[[Destination], bool],
                what: str) -> Decision | None:
    """The first rule whose process conditions hold and that names no destination or one
    that ``reaches`` accepts."""
    for rule in policy.rules:
        if not subject_matches(rule, s):
            continue
        if rule.to is None:
            return Decision(rule.action, rule.id, f"rule '{rule.id}' ({rule.where}) matches "
                            f"the process and names no destination")
        for dest, label in zip(rule.to, rule.to_labels, strict=True):
            if reaches(dest):
                return Decision(rule.action, rule.id, f"rule '{rule.id}' ({rule.where}) "
                                f"matches the process and {what} '{label}'")
    return None


def decide(policy: Policy, s: Subject, *, ip: str | None, port: int | None,
           protocol: str | None, names: tuple[str, ...] = (),
           same_build: bool = False) -> Decision:
    """The decision for a new flow from ``s`` to ``ip:port/protocol`` known by ``names``.

    ``same_build``: the loopback listener the flow reaches belongs to the flow's own build
    (the caller found every socket listening there among the build's processes).
    """
    if is_loopback(ip):
        if policy.loopback == "allow":
            return Decision("allow", "loopback", "loopback destinations are allowed "
                            "(loopback: allow)")
        if policy.loopback == "same-build" and same_build:
            return Decision("allow", "loopback", "a listener of the same build "
                            "(loopback: same-build)")
    return _first_rule(policy, s, lambda d: d.matches(ip, port, protocol, names),
                       "destination") or \
        Decision(policy.defaults[s.role], f"default:{s.role}",
                 f"no rule matches; the default for role {s.role}")


def decide_name(policy: Policy, s: Subject, name: str) -> Decision:
    """Whether ``s`` may resolve ``name``: the first rule for the process whose destinations
    can be reached by that name decides (a CIDR-only destination never can)."""
    return _first_rule(policy, s, lambda d: d.matches_name(name),
                       "names of destination") or \
        Decision(policy.defaults[s.role], f"default:{s.role}",
                 f"no rule names {name} for this process; the default for role {s.role}")
