"""Load policy files: parse with positions, validate strictly, merge drop-ins, freeze.

Unknown keys are errors (a typo in a security policy must not silently allow), and every
error names ``file:line:column``, the key, and what was expected. Drop-ins (``*.yaml`` in a
directory, by file name) may add ``groups`` and ``rules`` only; ``mode``, ``loopback`` and
``defaults`` belong to the main file. Rules keep their order: the main file's, then each
drop-in's in file-name order.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import heapq
import ipaddress
import itertools
import os
from collections.abc import Sequence
from typing import Literal

import yaml

from egress_monitor.policy.names import NamePattern, NamePatternError
from egress_monitor.policy.schema import (
    ACTIONS,
    CONTAINERS,
    DEFAULT_CREDENTIAL_PATHS,
    MODES,
    NETNS,
    PROTOCOLS,
    ROLES,
    Action,
    Destination,
    Mode,
    Network,
    Policy,
    Rule,
)
from egress_monitor.policy.semver import VersionError, VersionReq
from egress_monitor.yamlcheck import Issue as PolicyIssue
from egress_monitor.yamlcheck import YamlError as PolicyError
from egress_monitor.yamlcheck import YamlFile, compose, read, shown, small_int

__all__ = ["MODES", "Mode", "Policy", "PolicyError", "PolicyIssue", "load_policy",
           "parse_files", "parse_policy"]
SUPPORTED_VERSIONS = (1,)
_MAIN_KEYS = ("version", "mode", "loopback", "known_bad_crates", "container_engine",
              "credential_reads", "secrets", "defaults", "groups", "rules")
_SECRETS_KEYS = ("names", "ignore")
_CREDENTIAL_KEYS = ("paths", "except_crates")
_DROPIN_KEYS = ("version", "groups", "rules")
_GROUP_KEYS = ("hosts", "cidrs", "ports", "protocols")
_RULE_KEYS = ("id", "role", "crate", "version", "exe", "ancestor", "root", "container",
              "netns", "to", "action")
_INT = "tag:yaml.org,2002:int"


def _destination(f: YamlFile, node: yaml.Node, key: str, label: str) -> Destination | None:
    fields = f.mapping(node, key, _GROUP_KEYS)
    if not fields:
        if isinstance(node, yaml.MappingNode):
            f.error(node, f"key '{key}': expected at least one of {', '.join(_GROUP_KEYS)}")
        return None
    hosts: list[NamePattern] = []
    cidrs: list[Network] = []
    ports: list[tuple[int, int]] = []
    protocols: set[str] = set()
    if "hosts" in fields:
        for item, text in f.strings(fields["hosts"][1], f"{key}.hosts"):
            try:
                hosts.append(NamePattern.parse(text))
            except NamePatternError as exc:
                f.error(item, f"key '{key}.hosts': {exc}")
    if "cidrs" in fields:
        for item, text in f.strings(fields["cidrs"][1], f"{key}.cidrs"):
            try:
                cidrs.append(ipaddress.ip_network(text, strict=True))
            except ValueError as exc:
                f.error(item, f"key '{key}.cidrs': '{text}' is not a CIDR ({exc})")
    if "ports" in fields:
        pnode = fields["ports"][1]
        for item in pnode.value if isinstance(pnode, yaml.SequenceNode) else [pnode]:
            text = item.value if isinstance(item, yaml.ScalarNode) else ""
            lo, sep, hi = str(text).partition("-")
            low, high = small_int(lo.strip()), small_int(hi.strip()) if sep else small_int(
                lo.strip())
            if low is not None and high is not None and 0 < low <= high < 65536:
                ports.append((low, high))
            else:
                f.error(item, f"key '{key}.ports': expected a port or a range 'LOW-HIGH' "
                        f"within 1-65535, got '{shown(item)}'")
    if "protocols" in fields:
        for item, text in f.strings(fields["protocols"][1], f"{key}.protocols"):
            if text not in PROTOCOLS:
                f.error(item, f"key '{key}.protocols': expected one of "
                        f"{', '.join(PROTOCOLS)}, got '{text}'")
            protocols.add(text)
    return Destination(label=label, hosts=tuple(hosts), cidrs=tuple(cidrs), ports=tuple(ports),
                       protocols=frozenset(protocols))


def _glob(f: YamlFile, node: yaml.Node, key: str) -> str | None:
    value = f.string(node, key)
    if value is not None and not value.startswith(("/", "*", "?", "[")):
        f.error(node, f"key '{key}': expected an absolute path or a glob such as "
                f"'*/build-script-*', got '{value}'")
        return None
    return value


def _rule(f: YamlFile, node: yaml.Node, index: int, groups: dict[str, Destination]
          ) -> Rule | None:
    key = f"rules[{index}]"
    fields = f.mapping(node, key, _RULE_KEYS)
    if not fields:
        return None
    before = len(f.issues)
    rule_id = f.string(fields["id"][1], f"{key}.id") if "id" in fields else None
    if "id" not in fields:
        f.error(node, f"{key}: missing key 'id'")
    action = f.choice(fields["action"][1], f"{key}.action", ACTIONS) if "action" in fields \
        else None
    if "action" not in fields:
        f.error(node, f"{key}: missing key 'action' (one of {', '.join(ACTIONS)})")
    roles = None
    if "role" in fields:
        roles = frozenset(r for _, r in f.strings(fields["role"][1], f"{key}.role"))
        for item, r in f.strings(fields["role"][1], f"{key}.role"):
            if r not in ROLES:
                f.error(item, f"key '{key}.role': expected one of {', '.join(ROLES)}, "
                        f"got '{r}'")
    crate = f.string(fields["crate"][1], f"{key}.crate") if "crate" in fields else None
    version = None
    if "version" in fields:
        text = f.string(fields["version"][1], f"{key}.version")
        if crate is None:
            f.error(fields["version"][0], f"key '{key}.version' needs 'crate'")
        if text is not None:
            try:
                version = VersionReq(text)
            except VersionError as exc:
                f.error(fields["version"][1], f"key '{key}.version': {exc}")
    exe = _glob(f, fields["exe"][1], f"{key}.exe") if "exe" in fields else None
    ancestor = _glob(f, fields["ancestor"][1], f"{key}.ancestor") if "ancestor" in fields \
        else None
    root = _glob(f, fields["root"][1], f"{key}.root") if "root" in fields else None
    container = f.choice(fields["container"][1], f"{key}.container", CONTAINERS) \
        if "container" in fields else None
    netns = f.choice(fields["netns"][1], f"{key}.netns", NETNS) if "netns" in fields else None
    to: list[Destination] | None = None
    labels: list[str] = []
    if "to" in fields:
        to = []
        tnode = fields["to"][1]
        for item in tnode.value if isinstance(tnode, yaml.SequenceNode) else [tnode]:
            if isinstance(item, yaml.ScalarNode):
                if item.value not in groups:
                    names = sorted(groups)
                    listed = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
                    f.error(item, f"key '{key}.to': no group named '{shown(item)}' (groups: "
                            f"{listed or 'none'})")
                else:
                    to.append(groups[item.value])
                    labels.append(item.value)
            else:
                dest = _destination(f, item, f"{key}.to", "inline")
                if dest is not None:
                    to.append(dest)
                    labels.append(f"inline@{f.where(item)}")
    if len(f.issues) > before or rule_id is None or action is None:
        return None
    return Rule(id=rule_id, action=_action(action), where=f.where(node), roles=roles,
                crate=crate.replace("-", "_") if crate else None, version=version, exe=exe,
                ancestor=ancestor, root=root, container=container, netns=netns,
                to=tuple(to) if to is not None else None,
                to_labels=tuple(labels))


def _action(text: str) -> Action:
    for a in ACTIONS:
        if a == text:
            return a
    raise ValueError(text)


_SELECTORS = ("crate", "exe", "ancestor", "root")


def _shadows(earlier: Rule, later: Rule) -> bool:
    """Whether ``earlier`` matches everything ``later`` matches (selectors already agree)."""
    return earlier.container in (None, later.container) and \
        earlier.netns in (None, later.netns) and \
        (earlier.roles is None or (later.roles is not None and later.roles <= earlier.roles)) \
        and (earlier.version is None or (later.version is not None and
                                         earlier.version.text == later.version.text)) \
        and (earlier.to is None or earlier.to_labels == later.to_labels)


def _shadow_warnings(rules: list[Rule]) -> list[str]:
    """Rules that can never decide: an earlier rule matches everything they match.

    Earlier rules are indexed by their selectors (crate, exe, ancestor, root): a rule can only
    be shadowed by one whose every selector is unset or the same as its own, so each rule
    looks at those few groups (at most 16) in rule order, not at every earlier rule."""
    out = []
    by_selectors: dict[tuple[str | None, ...], list[tuple[int, Rule]]] = {}
    for i, later in enumerate(rules):
        if later.crate is not None and later.roles is not None and \
                later.roles <= {"cargo", "other"}:
            out.append(f"{later.where}: rule '{later.id}' names a crate but roles "
                       f"{', '.join(sorted(later.roles))} never run a crate's code: it can "
                       "never match")
        own = tuple(getattr(later, a) for a in _SELECTORS)
        keys = set(itertools.product(*({None, v} for v in own)))
        groups = [by_selectors[k] for k in keys if k in by_selectors]
        for _j, earlier in heapq.merge(*groups, key=lambda item: item[0]):
            if _shadows(earlier, later):
                out.append(f"{later.where}: rule '{later.id}' is shadowed by rule "
                           f"'{earlier.id}' ({earlier.where}): it can never decide")
                break
        by_selectors.setdefault(own, []).append((i, later))
    return out


def _load_files(files: Sequence[tuple[str, str | bytes]]) -> Policy:
    issues: list[PolicyIssue] = []
    mode: Mode = "audit"
    version = 1
    loopback: Literal["allow", "same-build", "policy"] = "same-build"
    known_bad: Literal["alert", "kill-build"] = "alert"
    engine: Literal["alert", "deny", "kill-build"] = "alert"
    credential_paths: tuple[str, ...] = DEFAULT_CREDENTIAL_PATHS
    credential_except: frozenset[str] = frozenset()
    secret_names: frozenset[str] = frozenset()
    secret_ignore: frozenset[str] = frozenset()
    defaults: dict[str, Action] = dict.fromkeys(ROLES, "deny")
    groups: dict[str, Destination] = {}
    rules: list[Rule] = []
    ids: dict[str, str] = {}
    for n, (path, text) in enumerate(files):
        f = YamlFile(path, issues)
        root = compose(text, path)
        if root is None:
            issues.append(PolicyIssue(path, 1, 1, "empty policy: expected a mapping with "
                                      "'version'"))
            continue
        fields = f.mapping(root, "", _MAIN_KEYS if n == 0 else _DROPIN_KEYS)
        if not isinstance(root, yaml.MappingNode):
            issues[-1] = PolicyIssue(path, 1, 1, "expected a mapping at the top level")
            continue
        if "version" not in fields:
            issues.append(PolicyIssue(path, 1, 1, "missing key 'version' (expected 1)"))
        else:
            vnode = fields["version"][1]
            if vnode.tag != _INT or small_int(vnode.value) not in SUPPORTED_VERSIONS:
                f.error(vnode, f"key 'version': expected 1, got '{shown(vnode)}'")
        if "mode" in fields:
            got = f.choice(fields["mode"][1], "mode", MODES)
            mode = "enforce" if got == "enforce" else "audit"
        if "loopback" in fields:
            got = f.choice(fields["loopback"][1], "loopback", ("allow", "same-build", "policy"))
            loopback = "allow" if got == "allow" else "policy" if got == "policy" \
                else "same-build"
        if "known_bad_crates" in fields:
            got = f.choice(fields["known_bad_crates"][1], "known_bad_crates",
                           ("alert", "kill-build"))
            known_bad = "kill-build" if got == "kill-build" else "alert"
        if "container_engine" in fields:
            got = f.choice(fields["container_engine"][1], "container_engine",
                           ("alert", "deny", "kill-build"))
            engine = "kill-build" if got == "kill-build" else "deny" if got == "deny" \
                else "alert"
        if "credential_reads" in fields:
            cred = f.mapping(fields["credential_reads"][1], "credential_reads",
                             _CREDENTIAL_KEYS)
            if "paths" in cred:
                paths = []
                for item, text in f.strings(cred["paths"][1], "credential_reads.paths"):
                    if text.startswith("/") or ".." in text.split("/") or not text:
                        f.error(item, f"key 'credential_reads.paths': '{text}' must be a "
                                "path relative to $HOME, without '..'")
                    else:
                        paths.append(text)
                credential_paths = tuple(paths)
            if "except_crates" in cred:
                credential_except = frozenset(
                    text.replace("-", "_") for _item, text in
                    f.strings(cred["except_crates"][1], "credential_reads.except_crates"))
        if "secrets" in fields:
            sec = f.mapping(fields["secrets"][1], "secrets", _SECRETS_KEYS)
            if "names" in sec:
                secret_names = frozenset(t for _i, t in f.strings(sec["names"][1],
                                                                   "secrets.names"))
            if "ignore" in sec:
                secret_ignore = frozenset(t for _i, t in f.strings(sec["ignore"][1],
                                                                    "secrets.ignore"))
        if "defaults" in fields:
            for role, (_k, v) in f.mapping(fields["defaults"][1], "defaults", ROLES).items():
                got = f.choice(v, f"defaults.{role}", ACTIONS)
                if got is not None:
                    defaults[role] = _action(got)
        if "groups" in fields:
            gnode = fields["groups"][1]
            if not isinstance(gnode, yaml.MappingNode):
                f.error(gnode, "key 'groups': expected a mapping of group names")
            else:
                for k, v in gnode.value:
                    if not isinstance(k, yaml.ScalarNode):
                        f.error(k, "key 'groups': expected group names, got "
                                f"{shown(k)}")
                        continue
                    if k.value in groups:
                        f.error(k, f"group '{k.value}' is defined twice")
                        continue
                    dest = _destination(f, v, f"groups.{k.value}", str(k.value))
                    if dest is not None:
                        groups[str(k.value)] = dest
        if "rules" in fields:
            rnode = fields["rules"][1]
            if not isinstance(rnode, yaml.SequenceNode):
                f.error(rnode, "key 'rules': expected a list of rules")
            else:
                for i, item in enumerate(rnode.value):
                    rule = _rule(f, item, i, groups)
                    if rule is None:
                        continue
                    if rule.id in ids:
                        f.error(item, f"rule id '{rule.id}' is used twice (first at "
                                f"{ids[rule.id]})")
                        continue
                    ids[rule.id] = rule.where
                    rules.append(rule)
    if issues:
        raise PolicyError(issues)
    digest = hashlib.sha256(b"".join(t.encode() if isinstance(t, str) else t
                                     for _, t in files)).hexdigest()
    return Policy(mode=mode, version=version, source=files[0][0], digest=digest,
                  loopback=loopback, defaults=defaults, rules=tuple(rules),
                  known_bad_crates=known_bad, container_engine=engine,
                  credential_paths=credential_paths,
                  credential_except_crates=credential_except,
                  secret_names=secret_names, secret_ignore=secret_ignore,
                  warnings=tuple(_shadow_warnings(rules)))


def parse_policy(text: str | bytes, path: str = "<policy>") -> Policy:
    """Validate one policy text; raises PolicyError naming every problem, and nothing else,
    for any input (bounded: see :mod:`egress_monitor.yamlcheck`)."""
    return _load_files([(path, text)])


def parse_files(files: Sequence[tuple[str, str | bytes]]) -> Policy:
    """Validate a main policy text and its drop-ins' texts, as (path, text) in load order."""
    return _load_files(files)


def dropin_files(directory: str) -> list[str]:
    """The drop-in files of a directory, in the order they apply."""
    return sorted(p for p in glob.glob(os.path.join(directory, "*.yaml"))
                  if fnmatch.fnmatch(os.path.basename(p), "*.yaml"))


def load_policy(path: str, dropin_dir: str | None = None) -> Policy:
    """Read and validate a policy file and its drop-ins; raises PolicyError (only) for any
    problem: unreadable, not UTF-8, too large or too deep, invalid."""
    try:
        paths = [path] + (dropin_files(dropin_dir) if dropin_dir else [])
    except OSError as exc:  # glob does not raise today; a safety net for the contract
        raise PolicyError([PolicyIssue(dropin_dir or path, 1, 1, f"cannot list: {exc}")]
                          ) from None
    files: list[tuple[str, str | bytes]] = [(p, read(p)) for p in paths]
    return _load_files(files)


def no_policy() -> Policy:
    """What runs without ``--policy``: audit mode, every role allowed by default."""
    return Policy(mode="audit", version=1, source="<none>", digest="none", loopback="allow",
                  defaults=dict.fromkeys(ROLES, "allow"))
