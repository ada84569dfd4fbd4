"""What changed between two policies, in one line for the journal (pure)."""

from __future__ import annotations

import dataclasses

from egress_monitor.policy.schema import Policy, Rule


def _same(a: Rule, b: Rule) -> bool:
    # A rule that only moved to another line is the same rule.
    return dataclasses.replace(a, where="") == dataclasses.replace(b, where="")


def describe(old: Policy, new: Policy) -> str:
    """``digest 1a2b3c4d5e6f -> 6f5e4d3c2b1a, 3 rule(s); added: x; removed: y; changed: z;
    mode audit -> enforce; default build-script deny -> kill-build``, or ``no change``."""
    parts = [f"digest {old.digest[:12]} -> {new.digest[:12]}, {len(new.rules)} rule(s)"]
    before = {r.id: r for r in old.rules}
    after = {r.id: r for r in new.rules}
    added = [i for i in after if i not in before]
    removed = [i for i in before if i not in after]
    changed = [i for i in after if i in before and not _same(before[i], after[i])]
    for label, ids in (("added", added), ("removed", removed), ("changed", changed)):
        if ids:
            parts.append(f"{label}: {', '.join(ids)}")
    if old.mode != new.mode:
        parts.append(f"mode {old.mode} -> {new.mode}")
    if old.loopback != new.loopback:
        parts.append(f"loopback {old.loopback} -> {new.loopback}")
    if old.known_bad_crates != new.known_bad_crates:
        parts.append(f"known_bad_crates {old.known_bad_crates} -> {new.known_bad_crates}")
    for role, action in new.defaults.items():
        if old.defaults.get(role) != action:
            parts.append(f"default {role} {old.defaults.get(role)} -> {action}")
    if old.digest == new.digest:
        return f"no change (digest {new.digest[:12]})"
    if len(parts) == 1:
        parts.append("same rules and settings (comments or layout only)")
    return "; ".join(parts)
