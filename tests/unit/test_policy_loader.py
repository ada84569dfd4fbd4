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
        "p.yaml:2:7: key 'mode': expected one of audit, enforce, got 'enforse'"]
    assert errors("version: 1\nmoed: audit\n") == [
        "p.yaml:2:1: unknown key 'moed' (expected one of: version, mode, loopback, "
        "known_bad_crates, container_engine, credential_reads, secrets, defaults, "
        "groups, rules)"]
    assert errors("version: 2\n") == ["p.yaml:1:10: key 'version': expected 1, got '2'"]
    assert errors("mode: audit\n") == ["p.yaml:1:1: missing key 'version' (expected 1)"]
    assert errors("version: 1\nmode: [audit\n")[0].startswith("p.yaml:3:1: invalid YAML:")
    assert errors("") == ["p.yaml:1:1: empty policy: expected a mapping with 'version'"]
    assert errors("- a\n") == ["p.yaml:1:1: expected a mapping at the top level"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(str(tmp_path / "missing.yaml"))




GOOD = """\
version: 1
mode: enforce
defaults: {build-script: kill-build}
groups:
  reg: {hosts: [crates.io, "*.crates.io"], ports: [443, "8000-8100"], protocols: [tcp]}
  lan: {cidrs: [198.51.100.0/24, "2001:db8::/32"]}
rules:
  - {id: cargo-reg, role: cargo, to: [reg], action: allow}
  - id: v8
    role: build-script
    crate: v8
    version: ">=0.80, <1"
    exe: "*/curl"
    ancestor: "*/build-script-*"
    root: "*/cargo"
    to: [{hosts: [github.com], ports: [443]}]
    action: alert
"""


def test_full_language_loads() -> None:
    policy = parse_policy(GOOD, "p.yaml")
    assert policy.mode == "enforce" and policy.defaults["build-script"] == "kill-build"
    assert policy.defaults["rustc"] == "deny"
    assert [r.id for r in policy.rules] == ["cargo-reg", "v8"]
    v8 = policy.rules[1]
    assert v8.crate == "v8" and v8.version is not None and v8.version.matches("0.92.0")
    assert v8.where == "p.yaml:9" and v8.to_labels == ("inline@p.yaml:16",)
    assert policy.warnings == ()


@pytest.mark.parametrize("text, message", [
    ("version: 1\nrules:\n  - {id: a, action: allow, rolle: cargo}\n",
     "p.yaml:3:28: unknown key 'rules[0].rolle' (expected one of: id, role, crate, version, "
     "exe, ancestor, root, container, netns, to, action)"),
    ("version: 1\nrules:\n  - {id: a, action: permit}\n",
     "p.yaml:3:21: key 'rules[0].action': expected one of allow, deny, alert, kill-build, "
     "got 'permit'"),
    ("version: 1\nrules:\n  - {id: a, action: allow, role: builder}\n",
     "p.yaml:3:34: key 'rules[0].role': expected one of cargo, rustc, build-script, "
     "crate-binary, other, got 'builder'"),
    ("version: 1\ngroups:\n  g: {cidrs: [10.0.0.1/8]}\n",
     "p.yaml:3:15: key 'groups.g.cidrs': '10.0.0.1/8' is not a CIDR (10.0.0.1/8 has host bits "
     "set)"),
    ("version: 1\ngroups:\n  g: {cidrs: [300.1.1.1/32]}\n",
     "p.yaml:3:15: key 'groups.g.cidrs': '300.1.1.1/32' is not a CIDR ('300.1.1.1/32' does "
     "not appear to be an IPv4 or IPv6 network)"),
    ("version: 1\ngroups:\n  g: {hosts: ['crates.*.io']}\n",
     "p.yaml:3:15: key 'groups.g.hosts': 'crates.*.io': a wildcard may only be the first "
     "label, as '*.example.com'"),
    ("version: 1\ngroups:\n  g: {ports: [0, 70000, 9-8, http]}\n",
     "p.yaml:3:15: key 'groups.g.ports': expected a port or a range 'LOW-HIGH' within "
     "1-65535, got '0'"),
    ("version: 1\nrules:\n  - {id: a, action: allow, crate: x, version: '>=1.x'}\n",
     "p.yaml:3:47: key 'rules[0].version': '>=1.x' is not a version requirement (expected "
     "e.g. '^1.2', '>=0.3, <0.4', '=0.3.10' or '*')"),
    ("version: 1\nrules:\n  - {id: a, action: allow, version: '1'}\n",
     "p.yaml:3:28: key 'rules[0].version' needs 'crate'"),
    ("version: 1\nrules:\n  - {id: a, action: allow, to: [nowhere]}\n",
     "p.yaml:3:33: key 'rules[0].to': no group named 'nowhere' (groups: none)"),
    ("version: 1\nrules:\n  - {id: a, action: allow, exe: curl}\n",
     "p.yaml:3:33: key 'rules[0].exe': expected an absolute path or a glob such as "
     "'*/build-script-*', got 'curl'"),
    ("version: 1\nrules:\n  - {id: a, action: allow}\n  - {id: a, action: deny}\n",
     "p.yaml:4:5: rule id 'a' is used twice (first at p.yaml:3)"),
    ("version: 1\nrules:\n  - {role: cargo}\n", "p.yaml:3:5: rules[0]: missing key 'id'"),
    ("version: 1\nloopback: maybe\n",
     "p.yaml:2:11: key 'loopback': expected one of allow, same-build, policy, got 'maybe'"),
    ("version: 1\ndefaults: {cargo: allow, gcc: deny}\n",
     "p.yaml:2:26: unknown key 'defaults.gcc' (expected one of: cargo, rustc, build-script, "
     "crate-binary, other)"),
    ("version: 1\nrules: {id: a}\n", "p.yaml:2:8: key 'rules': expected a list of rules"),
    ("version: 1\ngroups:\n  g: {hosts: [a.example], hosts: [b.example]}\n",
     "p.yaml:3:27: key 'groups.g.hosts' is given twice"),
])
def test_each_error_names_file_line_column_and_key(text: str, message: str) -> None:
    assert message in errors(text)


def test_warnings_for_rules_that_can_never_decide() -> None:
    policy = parse_policy("""\
version: 1
rules:
  - {id: all-scripts, role: build-script, action: deny}
  - {id: one-script, role: build-script, crate: ring, action: allow}
  - {id: cargo-crate, role: cargo, crate: ring, action: allow}
""", "p.yaml")
    assert policy.warnings == (
        "p.yaml:4: rule 'one-script' is shadowed by rule 'all-scripts' (p.yaml:3): it can "
        "never decide",
        "p.yaml:5: rule 'cargo-crate' names a crate but roles cargo never run a crate's "
        "code: it can never match")


def test_dropins_merge_in_file_name_order(tmp_path: Path) -> None:
    main = tmp_path / "policy.yaml"
    main.write_text("version: 1\nmode: enforce\nrules:\n  - {id: m, role: cargo, "
                    "action: allow}\n")
    d = tmp_path / "policy.d"
    d.mkdir()
    (d / "20-b.yaml").write_text("version: 1\nrules:\n  - {id: b, role: rustc, action: allow}\n")
    (d / "10-a.yaml").write_text("version: 1\ngroups:\n  g: {cidrs: [198.51.100.0/24]}\n"
                                 "rules:\n  - {id: a, role: other, to: [g], action: allow}\n")
    (d / "notes.txt").write_text("ignored")
    policy = load_policy(str(main), str(d))
    assert [r.id for r in policy.rules] == ["m", "a", "b"]
    (d / "30-c.yaml").write_text("version: 1\nmode: audit\n")
    with pytest.raises(PolicyError) as exc:
        load_policy(str(main), str(d))
    assert str(exc.value) == (f"{d}/30-c.yaml:2:1: unknown key 'mode' (expected one of: "
                              "version, groups, rules)")


def test_shipped_policies_load() -> None:
    load_policy(str(REPO / "policies" / "examples" / "strict.yaml"))
    policy = load_policy(str(REPO / "policies" / "default.yaml"))
    assert policy.mode == "audit" and policy.warnings == ()
