"""Decisions: precedence, every condition, destinations, names, loopback, versions."""

from __future__ import annotations

import pytest

from egress_monitor.policy.engine import Subject, decide, decide_name
from egress_monitor.policy.loader import parse_policy
from egress_monitor.policy.semver import VersionReq

POLICY = parse_policy("""\
version: 1
mode: enforce
defaults: {cargo: deny, build-script: kill-build, other: allow}
groups:
  reg: {hosts: [crates.io, "*.crates.io"], ports: [443], protocols: [tcp]}
  gh: {hosts: [github.com, "*.githubusercontent.com"], ports: [443]}
  lab: {cidrs: [198.51.100.0/24]}
rules:
  - {id: cargo-reg, role: cargo, to: [reg], action: allow}
  - id: v8-curl
    role: build-script
    crate: v8
    version: ">=0.80"
    exe: "*/curl"
    ancestor: "*/build-script-*"
    to: [gh]
    action: allow
  - {id: lab-alert, role: [build-script, crate-binary], to: [lab], action: alert}
  - {id: under-make, root: "*/make", action: deny}
""", "p.yaml")
V8_CURL = Subject(role="build-script", crate="v8", version="0.92.0", exe="/usr/bin/curl",
                  ancestors=("/usr/bin/cargo", "/t/build/v8-0123456789abcdef/build-script-build"),
                  root_exe="/usr/bin/cargo")


def d(s: Subject, ip: str | None = None, port: int | None = 443, proto: str = "tcp",
      names: tuple[str, ...] = ()) -> tuple[str, str]:
    decision = decide(POLICY, s, ip=ip, port=port, protocol=proto, names=names)
    return decision.action, decision.rule


def test_first_matching_rule_decides_then_the_role_default() -> None:
    cargo = Subject(role="cargo", exe="/usr/bin/cargo")
    assert d(cargo, "203.0.113.9", names=("index.crates.io",)) == ("allow", "cargo-reg")
    assert d(cargo, "203.0.113.9", names=("crates.io",)) == ("allow", "cargo-reg")
    assert d(cargo, "203.0.113.9", names=("evilcrates.io",)) == ("deny", "default:cargo")
    assert d(cargo, "203.0.113.9", port=80, names=("crates.io",)) == ("deny", "default:cargo")
    assert d(cargo, "203.0.113.9", proto="udp", names=("crates.io",)) == ("deny",
                                                                          "default:cargo")
    assert d(Subject(role="other")) == ("allow", "default:other")


def test_every_process_condition_must_hold() -> None:
    gh = ("objects.githubusercontent.com",)
    assert d(V8_CURL, names=gh) == ("allow", "v8-curl")
    for changed in (
        Subject(role="build-script", crate="v8", version="0.79.0", exe="/usr/bin/curl",
                ancestors=V8_CURL.ancestors),                     # version
        Subject(role="build-script", crate="v8-sys", version="0.92.0", exe="/usr/bin/curl",
                ancestors=V8_CURL.ancestors),                     # crate
        Subject(role="build-script", crate="v8", version="0.92.0", exe="/usr/bin/wget",
                ancestors=V8_CURL.ancestors),                     # exe
        Subject(role="build-script", crate="v8", version="0.92.0", exe="/usr/bin/curl",
                ancestors=("/usr/bin/cargo",)),                   # ancestor
        Subject(role="build-script", crate="v8", version=None, exe="/usr/bin/curl",
                ancestors=V8_CURL.ancestors),                     # unknown version
    ):
        assert d(changed, names=gh) == ("kill-build", "default:build-script"), changed


def test_crate_names_compare_with_dashes_as_underscores() -> None:
    policy = parse_policy("version: 1\nrules:\n  - {id: r, crate: ort-sys, action: allow}\n")
    for crate in ("ort-sys", "ort_sys"):
        s = Subject(role="build-script", crate=crate)
        assert decide(policy, s, ip=None, port=None, protocol=None).rule == "r"


def test_cidr_destinations_and_multiple_roles() -> None:
    test_bin = Subject(role="crate-binary", crate="app")
    assert d(test_bin, "198.51.100.7", port=8080) == ("alert", "lab-alert")
    assert d(test_bin, "192.0.2.7", port=8080) == ("deny", "default:crate-binary")
    assert d(Subject(role="build-script"), "2001:db8::1") == ("kill-build",
                                                              "default:build-script")


def test_root_exe_and_loopback() -> None:
    assert d(Subject(role="other", root_exe="/usr/bin/make"), "198.51.100.9") == \
        ("deny", "under-make")
    # The default, same-build: the build's own listener is allowed, any other is judged.
    own = decide(POLICY, Subject(role="build-script"), ip="127.0.0.1", port=5432,
                 protocol="tcp", same_build=True)
    assert (own.action, own.rule) == ("allow", "loopback")
    assert d(Subject(role="build-script"), "127.0.0.1", port=5432) == \
        ("kill-build", "default:build-script")
    assert d(Subject(role="other"), "::1") == ("allow", "default:other")
    assert POLICY.loopback == "same-build"
    everything = parse_policy("version: 1\nloopback: allow\n")
    assert decide(everything, Subject(role="rustc"), ip="::1", port=1,
                  protocol="tcp").rule == "loopback"
    strict = parse_policy("version: 1\nloopback: policy\n")
    assert decide(strict, Subject(role="rustc"), ip="127.0.0.1", port=1, protocol="tcp",
                  same_build=True).rule == "default:rustc"
    assert decide(strict, Subject(role="rustc"), ip="127.0.0.1", port=1,
                  protocol="tcp").rule == "default:rustc"


def test_names_follow_the_same_rules() -> None:
    cargo = Subject(role="cargo")
    assert decide_name(POLICY, cargo, "static.crates.io").action == "allow"
    assert decide_name(POLICY, cargo, "evil.example").rule == "default:cargo"
    assert decide_name(POLICY, V8_CURL, "github.com").rule == "v8-curl"
    # A CIDR-only destination allows no name.
    lab = Subject(role="crate-binary")
    assert decide_name(POLICY, lab, "anything.example").action == "deny"
    # A rule with no destination decides every name.
    assert decide_name(POLICY, Subject(role="other", root_exe="/usr/bin/make"),
                       "crates.io").rule == "under-make"


@pytest.mark.parametrize("req, version, ok", [
    ("^1.2", "1.9.9", True), ("^1.2", "2.0.0", False), ("0.3", "0.3.10", True),
    ("0.3", "0.4.0", False), ("^0.0.3", "0.0.4", False), (">=0.3, <0.4", "0.3.99", True),
    ("=0.3.10", "0.3.11", False), ("*", "9.9.9", True), ("1.*", "2.0.0", False),
    ("~1.2", "1.3.0", False), (">0.3.10", "0.3.10", False), ("<=1.2", "1.2.9", True),
    ("^1.2", "1.5.0-alpha", False), (">=1.0.0-alpha", "1.0.0-beta", True),
    ("=1.0.0-alpha.1", "1.0.0-alpha.2", False), ("^1", "not-a-version", False),
])
def test_version_requirements(req: str, version: str, ok: bool) -> None:
    assert VersionReq(req).matches(version) is ok
