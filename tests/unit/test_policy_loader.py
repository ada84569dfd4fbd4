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
        "p.yaml:2:1: unknown key 'moed' (expected one of: mode, version)"]
    assert errors("version: 2\n") == ["p.yaml:1:10: key 'version': expected 1, got '2'"]
    assert errors("mode: audit\n") == ["p.yaml:1:1: missing key 'version' (expected 1)"]
    assert errors("version: 1\nmode: [audit\n")[0].startswith("p.yaml:3:1: invalid YAML:")
    assert errors("") == [
        "p.yaml:1:1: empty policy: expected a mapping with 'version' and 'mode'"]
    assert errors("- a\n") == ["p.yaml:1:1: expected a mapping at the top level"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(str(tmp_path / "missing.yaml"))
