"""A policy drop-in learned from audited builds (pure): ``egress-monitor policy suggest``.

From connection records it makes one group per role, crate, destination and protocol (the
hostname the build resolved when it did, else the address; the ports seen) and one ``allow``
rule per role and crate naming those groups, each commented with how often and when it was
seen. With a base policy, what the base already allows is left out.

What an alert flagged is never allowed: a destination of a blocked attempt, an HTTP request
carrying credential names, an unlisted TLS name or an upload, everything a known-bad crate
did, and names under a DNS-tunnel parent. Those are listed apart, commented out, with the
reason. Every string from a build is attacker-chosen: hostnames are used only when they are
valid policy names, and comments keep printable ASCII only, so nothing can leave its comment.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from egress_monitor.policy.engine import Subject, decide
from egress_monitor.policy.names import NamePattern, NamePatternError
from egress_monitor.policy.schema import Policy

CRATE_ROLES = ("rustc", "build-script", "crate-binary")  # roles whose processes run a crate
# Alert kinds about a flow that make its destination one never to allow.
FLOW_ALERTS = ("blocked_attempt", "tls_unlisted_name", "upload")
MAX_COMMENT = 160


@dataclass(slots=True)
class _Seen:
    ports: set[int] = field(default_factory=set)
    count: int = 0
    builds: set[str] = field(default_factory=set)
    first: str = ""
    last: str = ""

    def add(self, port: int, build: str, ts: str) -> None:
        if port:
            self.ports.add(port)
        self.count += 1
        self.builds.add(build)
        self.first = min(self.first, ts) if self.first else ts
        self.last = max(self.last, ts)

    def note(self) -> str:
        return (f"seen {self.count} time(s) in {len(self.builds)} build(s), "
                f"{self.first} .. {self.last}")


@dataclass(frozen=True, slots=True)
class Suggestion:
    """The drop-in's text, and how many rules and refused destinations it holds."""

    text: str
    rules: int
    groups: int
    refused: int


def comment(text: str) -> str:
    """Printable ASCII only, bounded: safe inside a YAML comment."""
    clean = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return clean if len(clean) <= MAX_COMMENT else clean[:MAX_COMMENT - 3] + "..."


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "x"


def _valid_host(name: str) -> bool:
    try:
        NamePattern.parse(name)
    except NamePatternError:
        return False
    return not name.startswith("*")


def _crate_of(r: dict[str, Any]) -> tuple[str | None, str | None]:
    crate = r.get("crate")
    if not isinstance(crate, dict) or not crate.get("name"):
        return None, None
    return str(crate["name"]), (str(crate["version"]) if crate.get("version") else None)


def _flagged(records: list[dict[str, Any]]) -> tuple[dict[tuple[str, int], str],
                                                    dict[tuple[str, str | None], str],
                                                    dict[str, str]]:
    """What alerts flagged: destinations (ip, port), crates (name, version), DNS parents."""
    dests: dict[tuple[str, int], str] = {}
    crates: dict[tuple[str, str | None], str] = {}
    parents: dict[str, str] = {}
    for r in records:
        if r.get("type") != "alert":
            continue
        kind = str(r.get("kind"))
        ev = r.get("evidence") or {}
        if kind == "known_bad_crate":
            crates[(str(ev.get("crate")), ev.get("version"))] = \
                f"known-bad crate: {ev.get('why')}"
        elif kind == "dns_tunnel":
            parents[str(ev.get("parent", r.get("parent")))] = "DNS tunnel-shaped queries"
        elif kind in FLOW_ALERTS or (kind == "http_post" and ev.get("secret_names")):
            dst = ev.get("dst") or {}
            what = kind if kind != "http_post" else \
                f"HTTP {ev.get('method')} carrying {', '.join(ev['secret_names'])}"
            dests[(str(dst.get("ip")), int(dst.get("port") or 0))] = f"alert {what}"
    return dests, crates, parents


def _why_refused(r: dict[str, Any], flagged: tuple[dict[tuple[str, int], str],
                                                   dict[tuple[str, str | None], str],
                                                   dict[str, str]]) -> str | None:
    dests, crates, parents = flagged
    dst = r.get("dst") or {}
    key = (str(dst.get("ip")), int(dst.get("port") or 0))
    if key in dests:
        return dests[key]
    name, version = _crate_of(r)
    if name is not None and ((name, version) in crates or (name, None) in crates):
        return crates.get((name, version)) or crates[(name, None)]
    if r.get("reason"):
        return f"refused in every mode ({r['reason']})"
    for n in dst.get("names") or ():
        for parent in parents:
            if n == parent or str(n).endswith("." + parent):
                return parents[parent]
    return None


def _where(r: dict[str, Any]) -> tuple[str, str]:
    """("hosts", name) when the build resolved a valid name for the address, else
    ("cidrs", the address as a one-address network)."""
    dst = r.get("dst") or {}
    names = [str(n) for n in dst.get("names") or () if _valid_host(str(n))]
    if names:
        return "hosts", names[0]
    ip = ipaddress.ip_address(str(dst.get("ip")))
    return "cidrs", f"{ip}/{ip.max_prefixlen}"


def _allowed_by(base: Policy, r: dict[str, Any]) -> bool:
    name, version = _crate_of(r)
    process = r.get("process") or {}
    lineage = [str(n.get("exe")) for n in r.get("lineage") or () if n.get("exe")]
    subject = Subject(role=str(r.get("role")), crate=name, version=version,
                      exe=process.get("exe"), ancestors=tuple(lineage[:-1]),
                      root_exe=(r.get("build") or {}).get("root_exe"))
    dst = r.get("dst") or {}
    verdict = decide(base, subject, ip=str(dst.get("ip")), port=int(dst.get("port") or 0),
                     protocol=str(r.get("protocol")),
                     names=tuple(str(n) for n in dst.get("names") or ()))
    return verdict.action in ("allow", "alert")


def suggest(records: Iterable[dict[str, Any]], base: Policy | None = None,
            prefix: str = "seen") -> Suggestion:
    """The drop-in for these records. ``prefix`` starts every group name and rule id."""
    records = list(records)
    flagged = _flagged(records)
    # (role, crate, crate version) -> (kind, value, protocol) -> seen
    allow: dict[tuple[str, str | None], dict[tuple[str, str, str], _Seen]] = {}
    versions: dict[tuple[str, str | None], set[str]] = {}
    refused: dict[tuple[str, str, str, str], tuple[str, _Seen]] = {}
    for r in records:
        if r.get("type") != "connection" or r.get("rule") == "loopback":
            continue
        try:
            dst = dict(r.get("dst") or {})
            kind, value = _where(r)
            int(dst.get("port") or 0)
        except (ValueError, TypeError, AttributeError):
            continue  # a record of a shape the daemon never writes: nothing to learn
        role = str(r.get("role"))
        name, version = _crate_of(r)
        crate = name if role in CRATE_ROLES else None
        port, ts, build = int(dst.get("port") or 0), str(r.get("ts")), \
            str((r.get("build") or {}).get("id"))
        protocol = str(r.get("protocol"))
        why = _why_refused(r, flagged)
        if why is not None:
            label = f"{name} {version or ''}".strip() if name else "-"
            entry = refused.setdefault((role, label, f"{value}:{port}/{protocol}", why),
                                       (why, _Seen()))
            entry[1].add(port, build, ts)
            continue
        if base is not None and _allowed_by(base, r):
            continue
        allow.setdefault((role, crate), {}).setdefault((kind, value, protocol),
                                                       _Seen()).add(port, build, ts)
        if crate and version:
            versions.setdefault((role, crate), set()).add(version)
    return _render(allow, versions, refused, prefix)


def _render(allow: dict[tuple[str, str | None], dict[tuple[str, str, str], _Seen]],
            versions: dict[tuple[str, str | None], set[str]],
            refused: dict[tuple[str, str, str, str], tuple[str, _Seen]],
            prefix: str) -> Suggestion:
    head = ["# egress-monitor policy suggest: what the audited builds did, as a drop-in.",
            "# Review it, then put it in policy.d/ and check it:",
            "#   egress-monitor policy check /etc/egress-monitor/policy.yaml --dir policy.d",
            "version: 1"]
    groups: list[str] = []
    rules: list[str] = []
    used: set[str] = set()
    for (role, crate), dests in sorted(allow.items(), key=lambda kv: (kv[0][0],
                                                                      kv[0][1] or "")):
        names = []
        for (kind, value, protocol), seen in sorted(dests.items()):
            gname = f"{prefix}-{_slug(role)}-{_slug(crate or 'any')}-{_slug(value)}-{protocol}"
            while gname in used:
                gname += "-x"
            used.add(gname)
            names.append(gname)
            groups.append(f"  {gname}:   # {comment(seen.note())}")
            groups.append(f"    {kind}: [{json.dumps(value)}]")
            if seen.ports:
                groups.append(f"    ports: [{', '.join(str(p) for p in sorted(seen.ports))}]")
            groups.append(f"    protocols: [{protocol}]")
        total = sum(s.count for s in dests.values())
        seen_in = {b for s in dests.values() for b in s.builds}
        rid = f"{prefix}-{_slug(role)}-{_slug(crate or 'any')}"
        rules.append(f"  # {comment(f'{role} of {crate}' if crate else role)}: {total} "
                     f"connection(s) in {len(seen_in)} build(s)"
                     + (f"; versions seen: {comment(', '.join(sorted(versions[(role, crate)])))}"
                        if (role, crate) in versions else ""))
        rules.append(f"  - id: {rid}")
        rules.append(f"    role: {role}")
        if crate:
            rules.append(f"    crate: {json.dumps(crate)}")
        rules.append(f"    to: [{', '.join(names)}]")
        rules.append("    action: allow")
    out = list(head)
    out += (["groups:", *groups] if groups else [])
    out += (["rules:", *rules] if rules else ["rules: []"])
    if refused:
        out += ["", "# Never suggested: what alerts flagged. Allow any of it only after you",
                "# know why the build did it."]
        for (role, label, where, _why), (why, seen) in sorted(refused.items()):
            out.append(f"# - {comment(f'{role} of {label} to {where}')}: {comment(why)}; "
                       f"{comment(seen.note())}")
    return Suggestion("\n".join(out) + "\n", rules=len(allow), groups=len(used),
                      refused=len(refused))
