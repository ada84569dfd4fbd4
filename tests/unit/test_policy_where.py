"""Rules keyed on where a build runs: ``container`` (any, none, a runtime) and ``netns``
(host, other); loading, errors as file:line:column:key, decisions, shadowing."""

from __future__ import annotations

import pytest

from egress_monitor.policy.engine import Subject, container_matches, decide
from egress_monitor.policy.loader import PolicyError, parse_policy

POLICY = parse_policy("""\
version: 1
mode: enforce
defaults: {build-script: allow, cargo: allow}
groups:
  lab: {cidrs: [198.51.100.0/24]}
rules:
  - {id: docker-scripts, role: build-script, container: docker, to: [lab], action: kill-build}
  - {id: any-container, container: any, to: [lab], action: alert}
  - {id: ns-other, netns: other, action: deny}
  - {id: host-bare, container: none, netns: host, to: [lab], action: allow}
""", "p.yaml")


@pytest.mark.parametrize(("subject", "expected"), [
    (Subject(role="build-script", container="docker", netns="other"),
     ("kill-build", "docker-scripts")),
    (Subject(role="cargo", container="docker", netns="other"), ("alert", "any-container")),
    (Subject(role="build-script", container="podman", netns="host"),
     ("alert", "any-container")),
    (Subject(role="build-script", container="kubernetes", netns="other"),
     ("alert", "any-container")),
    (Subject(role="build-script", container=None, netns="other"), ("deny", "ns-other")),
    (Subject(role="build-script", container=None, netns="host"), ("allow", "host-bare")),
    # A process gone before the decision: no netns-keyed rule matches it
    (Subject(role="build-script", container=None, netns=None),
     ("allow", "default:build-script")),
])
def test_where_a_build_runs_decides(subject: Subject, expected: tuple[str, str]) -> None:
    got = decide(POLICY, subject, ip="198.51.100.7", port=8080, protocol="tcp")
    assert (got.action, got.rule) == expected


def test_destination_still_narrows_a_where_rule() -> None:
    s = Subject(role="build-script", container="docker", netns="other")
    got = decide(POLICY, s, ip="192.0.2.7", port=8080, protocol="tcp")
    assert (got.action, got.rule) == ("deny", "ns-other")


@pytest.mark.parametrize(("wanted", "runtime", "holds"), [
    (None, None, True), (None, "docker", True), ("any", None, False), ("any", "crio", True),
    ("none", None, True), ("none", "podman", False), ("docker", "docker", True),
    ("docker", "podman", False), ("docker", None, False), ("kubernetes", "kubernetes", True),
])
def test_container_condition(wanted: str | None, runtime: str | None, holds: bool) -> None:
    assert container_matches(wanted, runtime) is holds


def test_defaults_of_a_subject_are_the_host_and_no_container() -> None:
    s = Subject(role="build-script")
    assert (s.container, s.netns) == (None, "host")
    assert decide(POLICY, s, ip="198.51.100.7", port=1, protocol="tcp").rule == "host-bare"


@pytest.mark.parametrize(("line", "message"), [
    ("{id: a, action: deny, container: lxc}",
     "p.yaml:3:38: key 'rules[0].container': expected one of any, none, docker, podman, "
     "containerd, crio, kubernetes, got 'lxc'"),
    ("{id: a, action: deny, netns: mine}",
     "p.yaml:3:34: key 'rules[0].netns': expected one of host, other, got 'mine'"),
    ("{id: a, action: deny, netns: [host]}",
     "p.yaml:3:34: key 'rules[0].netns': expected one of host, other, got 'a sequence'"),
])
def test_errors_name_file_line_column_and_key(line: str, message: str) -> None:
    with pytest.raises(PolicyError) as exc:
        parse_policy(f"version: 1\nrules:\n  - {line}\n", "p.yaml")
    assert message in [str(i) for i in exc.value.issues]


def test_a_where_condition_is_part_of_shadowing() -> None:
    policy = parse_policy("""\
version: 1
rules:
  - {id: in-docker, role: build-script, container: docker, action: deny}
  - {id: scripts, role: build-script, action: allow}
  - {id: scripts-other, role: build-script, netns: other, action: alert}
  - {id: docker-other, role: build-script, container: docker, netns: other, action: alert}
""", "p.yaml")
    # 'scripts' is not shadowed by a rule that needs a container; the later two are by it
    assert policy.warnings == (
        "p.yaml:5: rule 'scripts-other' is shadowed by rule 'scripts' (p.yaml:4): it can "
        "never decide",
        "p.yaml:6: rule 'docker-other' is shadowed by rule 'in-docker' (p.yaml:3): it can "
        "never decide")
