"""suggest.py on recorded audit events: the drop-in loads, allows what the builds did and
nothing new, and never allows what an alert flagged."""

from __future__ import annotations

from egress_monitor.policy.engine import Subject, decide
from egress_monitor.policy.loader import parse_files, parse_policy
from egress_monitor.suggest import comment, suggest
from tests.fixtures.audit_events import events

BASE = """version: 1
mode: enforce
defaults: {cargo: deny, rustc: deny, build-script: deny, crate-binary: deny, other: deny}
groups:
  crates-io: {hosts: [index.crates.io], ports: [443], protocols: [tcp]}
rules:
  - {id: cargo-registry, role: cargo, to: [crates-io], action: allow}
"""
SCRIPT = Subject(role="build-script", crate="evil-dep", version="0.3.10")


def test_the_drop_in_allows_what_was_seen_and_refuses_anything_new() -> None:
    result = suggest(events(), parse_policy(BASE, "base.yaml"))
    policy = parse_files([("base.yaml", BASE), ("seen.yaml", result.text)])
    assert not policy.warnings

    def action(s: Subject, ip: str, port: int, names: tuple[str, ...] = ()) -> str:
        return decide(policy, s, ip=ip, port=port, protocol="tcp", names=names).action

    assert action(SCRIPT, "198.51.100.2", 8080, ("pkg.test.example",)) == "allow"
    assert action(SCRIPT, "198.51.100.2", 8443, ("pkg.test.example",)) == "allow"
    assert action(SCRIPT, "198.51.100.6", 8080) == "allow"  # never resolved: its address
    # Anything new: another port, another address, another crate, another role.
    assert action(SCRIPT, "198.51.100.2", 9999, ("pkg.test.example",)) == "deny"
    assert action(SCRIPT, "198.51.100.7", 8080) == "deny"
    assert action(Subject(role="build-script", crate="other"), "198.51.100.6", 8080) == "deny"
    assert action(Subject(role="crate-binary", crate="evil-dep"), "198.51.100.6", 8080) == \
        "deny"
    # The base already allows cargo's registry: no rule of its own.
    assert "index.crates.io" not in result.text


def test_what_alerts_flagged_is_listed_apart_and_never_allowed() -> None:
    result = suggest(events())
    policy = parse_policy(result.text, "seen.yaml")
    bad = Subject(role="build-script", crate="bad-crate", version="1.0.0")
    assert decide(policy, SCRIPT, ip="198.51.100.66", port=80, protocol="tcp",
                  names=("collector.example",)).action == "deny"
    assert decide(policy, bad, ip="198.51.100.77", port=443, protocol="tcp",
                  names=("bad.example",)).action == "deny"
    refused = [ln for ln in result.text.splitlines() if ln.startswith("# - ")]
    assert len(refused) == 2 and result.refused == 2
    assert any("collector.example:80/tcp" in ln and "AWS_SECRET_ACCESS_KEY" in ln
               for ln in refused)
    assert any("bad-crate 1.0.0" in ln and "known-bad crate" in ln for ln in refused)
    # Loopback (the redirected DNS) is never a rule: the policy allows it on its own.
    assert "127.0.0.1" not in result.text


def test_rules_are_commented_with_how_often_and_when() -> None:
    text = suggest(events()).text
    assert "# seen 2 time(s) in 2 build(s), 2026-12-01T10:00:03.000000Z .. " \
        "2026-12-01T11:00:02.000000Z" in text
    assert 'hosts: ["pkg.test.example"]' in text and "ports: [8080, 8443]" in text


def test_hostile_strings_stay_inside_their_comments_and_bad_names_become_addresses() -> None:
    assert comment("a\nrules: []\x1b[2J") == "a?rules: []?[2J"
    records = events()
    records[4] = {**records[4], "dst": {**records[4]["dst"],
                                        "names": ['x"]\n  - injected', "Not A Name!"]}}
    text = suggest(records).text
    parse_policy(text, "seen.yaml")
    assert "injected" not in text and 'cidrs: ["198.51.100.2/32"]' in text
