"""policy/changes.py: the reload line in the journal names what changed."""

from __future__ import annotations

from egress_monitor.policy.changes import describe
from egress_monitor.policy.loader import parse_policy

OLD = """version: 1
mode: audit
rules:
  - {id: keep, role: cargo, action: allow}
  - {id: gone, role: rustc, action: allow}
  - {id: edited, role: other, action: allow}
"""
NEW = """version: 1
mode: enforce
defaults: {build-script: kill-build}

rules:
  - {id: keep, role: cargo, action: allow}
  - {id: edited, role: other, action: deny}
  - {id: fresh, role: crate-binary, action: allow}
"""


def test_added_removed_changed_mode_and_defaults() -> None:
    old, new = parse_policy(OLD, "p.yaml"), parse_policy(NEW, "p.yaml")
    assert describe(old, new) == (
        f"digest {old.digest[:12]} -> {new.digest[:12]}, 3 rule(s); added: fresh; "
        "removed: gone; changed: edited; mode audit -> enforce; "
        "default build-script deny -> kill-build")


def test_layout_only_and_no_change() -> None:
    old = parse_policy(OLD, "p.yaml")
    moved = parse_policy("# a comment\n" + OLD, "p.yaml")
    assert describe(old, moved).endswith("same rules and settings (comments or layout only)")
    assert describe(old, old) == f"no change (digest {old.digest[:12]})"
