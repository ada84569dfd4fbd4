"""Load a policy file: parse with positions, validate strictly, freeze.

This is the subset the core needs (a versioned document and its ``mode``); rules and
destination groups arrive with the policy engine. Already strict: an unknown key is an error,
because a typo in a security policy must not silently change what is allowed. Every error
names ``file:line:column``, the key, and what was expected.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import yaml

from egress_monitor.policy.names import (
    ALLOW_ALL,
    AllowAllNames,
    NameAllowList,
    NamePattern,
    NamePatternError,
    NamePolicy,
)

Mode = Literal["audit", "enforce"]
MODES: tuple[Mode, ...] = ("audit", "enforce")
SUPPORTED_VERSIONS = (1,)
_TOP_KEYS = {"version", "mode", "dns"}
_DNS_KEYS = {"allow"}


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem found in a policy file, 1-based line and column."""

    path: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.message}"


class PolicyError(ValueError):
    """A policy file failed to load; ``issues`` lists every problem found."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy; ``digest`` is the SHA-256 of the file's bytes."""

    mode: Mode
    version: int
    source: str
    digest: str
    names: NamePolicy = ALLOW_ALL


def _issue(path: str, node: yaml.Node, message: str) -> PolicyIssue:
    mark = node.start_mark
    return PolicyIssue(path, mark.line + 1, mark.column + 1, message)


def parse_policy(text: str, path: str = "<policy>") -> Policy:
    """Validate policy text; raises PolicyError naming every problem."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([PolicyIssue(path, line, col, f"invalid YAML: {problem}")]) from exc
    if root is None:
        raise PolicyError([PolicyIssue(path, 1, 1, "empty policy: expected a mapping with "
                                       "'version' and 'mode'")])
    if not isinstance(root, yaml.MappingNode):
        raise PolicyError([_issue(path, root, "expected a mapping at the top level")])
    issues: list[PolicyIssue] = []
    values: dict[str, yaml.Node] = {}
    for key_node, value_node in root.value:
        key = key_node.value
        if key not in _TOP_KEYS:
            issues.append(_issue(path, key_node, f"unknown key '{key}' (expected one of: "
                                 f"{', '.join(sorted(_TOP_KEYS))})"))
            continue
        values[key] = value_node
    version = 1
    if "version" not in values:
        issues.append(PolicyIssue(path, 1, 1, "missing key 'version' (expected 1)"))
    else:
        node = values["version"]
        if node.tag != "tag:yaml.org,2002:int" or int(node.value) not in SUPPORTED_VERSIONS:
            issues.append(_issue(path, node, f"key 'version': expected 1, got '{node.value}'"))
        else:
            version = int(node.value)
    mode: Mode = "audit"
    if "mode" in values:
        node = values["mode"]
        if node.value not in MODES:
            issues.append(_issue(path, node, f"key 'mode': expected 'audit' or 'enforce', "
                                 f"got '{node.value}'"))
        else:
            mode = node.value
    names: NamePolicy = AllowAllNames()
    if "dns" in values:
        names = _dns_section(path, values["dns"], issues)
    if issues:
        raise PolicyError(issues)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Policy(mode=mode, version=version, source=path, digest=digest, names=names)


def _dns_section(path: str, node: yaml.Node, issues: list[PolicyIssue]) -> NamePolicy:
    """``dns: {allow: [pattern, ...]}``: names builds may resolve (absent: all)."""
    if not isinstance(node, yaml.MappingNode):
        issues.append(_issue(path, node, "key 'dns': expected a mapping with 'allow'"))
        return AllowAllNames()
    patterns: list[NamePattern] = []
    for key_node, value_node in node.value:
        if key_node.value not in _DNS_KEYS:
            issues.append(_issue(path, key_node, f"unknown key 'dns.{key_node.value}' "
                                 "(expected: allow)"))
            continue
        if not isinstance(value_node, yaml.SequenceNode):
            issues.append(_issue(path, value_node, "key 'dns.allow': expected a list of "
                                 "hostnames or '*.domain' patterns"))
            continue
        for item in value_node.value:
            if not isinstance(item, yaml.ScalarNode) or item.tag != "tag:yaml.org,2002:str":
                issues.append(_issue(path, item, "key 'dns.allow': expected a hostname"))
                continue
            try:
                patterns.append(NamePattern.parse(item.value))
            except NamePatternError as exc:
                issues.append(_issue(path, item, f"key 'dns.allow': {exc}"))
    return NameAllowList(patterns)


def load_policy(path: str) -> Policy:
    """Read and validate a policy file; unreadable files are a PolicyError too."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise PolicyError([PolicyIssue(path, 1, 1, f"cannot read: {exc.strerror}")]) from exc
    return parse_policy(text, path)
