"""Policy loading: every error names file:line:column, the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from egress_monitor.policy.loader import PolicyError, load_policy, parse_policy

REPO = Path(__file__).parents[2]


def errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, "p.yaml")
    return [str(i) for i in exc.value.issues]


def test_shipped_default_policy_loads() -> None:
    policy = load_policy(str(REPO / "policies" / "default.yaml"))
    assert policy.mode == "audit" and policy.version == 1 and len(policy.digest) == 64


def test_error_messages() -> None:
    assert errors("version: 1\nmode: enforse\n") == [
        "p.yaml:2:7: key 'mode': expected 'audit' or 'enforce', got 'enforse'"]
    assert errors("version: 1\nmoed: audit\n") == [
        "p.yaml:2:1: unknown key 'moed' (expected one of: dns, mode, version)"]
    assert errors("version: 2\n") == ["p.yaml:1:10: key 'version': expected 1, got '2'"]
    assert errors("mode: audit\n") == ["p.yaml:1:1: missing key 'version' (expected 1)"]
    assert errors("version: 1\nmode: [audit\n")[0].startswith("p.yaml:3:1: invalid YAML:")
    assert errors("") == [
        "p.yaml:1:1: empty policy: expected a mapping with 'version' and 'mode'"]
    assert errors("- a\n") == ["p.yaml:1:1: expected a mapping at the top level"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(str(tmp_path / "missing.yaml"))


def test_dns_allow_list() -> None:
    policy = parse_policy("version: 1\ndns:\n  allow: [crates.io, '*.crates.io']\n", "p.yaml")
    decide = policy.names.decide
    assert decide("crates.io", "A", "cargo", None).allowed
    assert decide("index.crates.io", "A", "cargo", None).rule == "dns.allow:*.crates.io"
    assert decide("a.b.crates.io", "AAAA", "cargo", None).allowed  # any depth below
    assert not decide("evilcrates.io", "A", "build-script", "x").allowed
    assert not decide("crates.io.evil.example", "A", "build-script", "x").allowed
    default = parse_policy("version: 1\n", "p.yaml").names
    assert default.decide("anything.example", "TXT", "other", None).allowed


def test_dns_section_errors() -> None:
    assert errors("version: 1\ndns:\n  allow: ['a.*.com', '', 5]\n  deny: []\n") == [
        "p.yaml:3:11: key 'dns.allow': 'a.*.com': a wildcard may only be the first label, "
        "as '*.example.com'",
        "p.yaml:3:22: key 'dns.allow': '' names nothing",
        "p.yaml:3:26: key 'dns.allow': expected a hostname",
        "p.yaml:4:3: unknown key 'dns.deny' (expected: allow)"]
    assert errors("version: 1\ndns: [a]\n") == [
        "p.yaml:2:6: key 'dns': expected a mapping with 'allow'"]
    assert errors("version: 1\ndns:\n  allow: x.com\n") == [
        "p.yaml:3:10: key 'dns.allow': expected a list of hostnames or '*.domain' patterns"]
    assert errors("version: 1\ndns:\n  allow: [bad_label-.com]\n") == [
        "p.yaml:3:11: key 'dns.allow': 'bad_label-.com': 'bad_label-' is not a valid DNS "
        "label"]
