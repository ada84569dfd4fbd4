"""Fuzz target: the judgement of first data (HTTP heads, relays, SOCKS, TLS) in both modes."""

from __future__ import annotations

from egress_monitor.firstdata import judge, pending
from egress_monitor.policy.engine import Subject
from egress_monitor.policy.loader import parse_policy

ALLOWED: tuple[type[BaseException], ...] = ()
_POLICY = parse_policy("version: 1\nmode: enforce\ngroups:\n  z: {hosts: ['*.test.example']}\n"
                       "rules:\n  - {id: z, role: other, to: [z], action: allow}\n")


def target(data: bytes) -> None:
    pending(data)
    for enforce in (False, True):
        judge(data, spent=enforce, names=("pkg.test.example",),
              dst={"ip": "198.51.100.2", "port": 8080, "names": []},
              subject=Subject(role="other"), policy=_POLICY, enforce=enforce, hit=None)
