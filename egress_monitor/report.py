"""Per-build reports from recorded events (pure): ``egress-monitor report``, ``exec --summary``.

Input is event records as the daemon writes them (docs/events.md); output is one
:class:`BuildReport` per build: where it connected (by role and crate, with the verdict applied
and what the policy said, so audit mode shows what enforce would refuse), the DNS names it
asked, and its alerts. Renderers give text for a terminal, markdown for a CI job summary
(``$GITHUB_STEP_SUMMARY``) and JSON. Every string from a build (names, argv, paths) is
attacker-chosen: markdown escapes it so it cannot add rows, links or HTML.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from egress_monitor.sinks.terminal import sentence as alert_sentence

REFUSING = ("deny", "kill-build")
FORMATS = ("text", "markdown", "json")
MAX_LINE = 1 << 20  # a longer line is not an event the daemon wrote


@dataclass(frozen=True, slots=True)
class Destination:
    """Connections of one role and crate to one address, port and protocol, one verdict."""

    role: str
    crate: str | None  # "name version"
    names: tuple[str, ...]
    ip: str
    port: int
    protocol: str
    decision: str
    policy_decision: str
    rule: str
    count: int
    first: str
    last: str

    @property
    def would_be_denied(self) -> bool:
        """Let through now, refused by enforce mode."""
        return self.decision == "allow" and self.policy_decision in REFUSING


@dataclass(frozen=True, slots=True)
class NameAsked:
    """DNS queries of one role and crate for one name and type."""

    role: str
    crate: str | None
    name: str
    qtype: str
    decision: str
    policy_decision: str
    rcode: str
    count: int


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert, with the sentence on-call reads first."""

    ts: str
    kind: str
    severity: str
    role: str
    crate: str | None
    sentence: str


@dataclass(frozen=True, slots=True)
class BuildReport:
    """Everything recorded about one build."""

    id: str
    root_exe: str | None
    cwd: str | None
    argv: tuple[str, ...]
    mode: str | None
    started: str | None
    ended: str | None
    summary: dict[str, Any] | None
    destinations: tuple[Destination, ...] = ()
    names: tuple[NameAsked, ...] = ()
    alerts: tuple[Alert, ...] = field(default=())

    @property
    def would_be_denied(self) -> int:
        """Connections enforce mode would have refused."""
        return sum(d.count for d in self.destinations if d.would_be_denied)


def parse_lines(lines: Iterable[str]) -> tuple[list[dict[str, Any]], int]:
    """JSON-lines text to records; returns them and how many lines were not records."""
    records, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line) if len(line) <= MAX_LINE else None
        except ValueError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("type"), str) \
                and isinstance(value.get("ts"), str):
            records.append(value)
        else:
            bad += 1
    return records, bad


def parse_since(text: str, now: datetime) -> str:
    """``30m``/``2h``/``7d`` before ``now``, or an RFC 3339 time (or a prefix, as
    ``2026-12-01``): the earliest ``ts`` a build's start may have, as a comparable string."""
    m = re.fullmatch(r"(\d+)([smhd])", text)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        when = now.astimezone(UTC) - timedelta(**{unit: int(m.group(1))})
        return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if not re.fullmatch(r"\d{4}-\d\d-\d\d([T ]\d\d(:\d\d(:\d\d(\.\d+)?)?)?)?Z?", text):
        raise ValueError(f"expected e.g. 2h, 7d or 2026-12-01T10:00:00Z, got {text!r}")
    return text.replace(" ", "T").rstrip("Z")


def _crate(record: dict[str, Any]) -> str | None:
    crate = record.get("crate")
    if not isinstance(crate, dict) or not crate.get("name"):
        return None
    return f"{crate['name']} {crate.get('version') or ''}".strip()


class _Acc:
    """What is gathered for one build while reading."""

    def __init__(self, build: dict[str, Any]) -> None:
        self.build = build
        self.argv: tuple[str, ...] = ()
        self.mode: str | None = None
        self.started: str | None = None
        self.ended: str | None = None
        self.first: str | None = None
        self.summary: dict[str, Any] | None = None
        self.dests: dict[tuple[Any, ...], list[Any]] = {}
        self.names: dict[tuple[Any, ...], int] = {}  # see NameAsked's fields
        self.alerts: list[Alert] = []

    def add(self, r: dict[str, Any]) -> None:
        ts = str(r["ts"])
        self.first = self.first or ts
        rtype = r["type"]
        if rtype == "build_start":
            self.started = ts
            self.argv = tuple(str(a) for a in r.get("argv") or ())
        elif rtype == "build_end":
            self.ended, self.summary = ts, r.get("summary")
        elif rtype == "connection":
            self.mode = self.mode or r.get("mode")
            dst = r.get("dst") or {}
            key: tuple[Any, ...] = (str(r.get("role")), _crate(r), tuple(dst.get("names") or ()),
                   str(dst.get("ip")), int(dst.get("port") or 0), str(r.get("protocol")),
                   str(r.get("decision")), str(r.get("policy_decision") or r.get("decision")),
                   str(r.get("rule") or r.get("reason") or ""))
            seen = self.dests.setdefault(key, [0, ts, ts])
            seen[0], seen[2] = seen[0] + 1, ts
        elif rtype == "dns":
            q = r.get("query") or {}
            nkey = (str(r.get("role")), _crate(r), str(q.get("name")), str(q.get("type")),
                   str(r.get("decision")), str(r.get("policy_decision") or r.get("decision")),
                   str(r.get("rcode")))
            self.names[nkey] = self.names.get(nkey, 0) + 1
        elif rtype == "alert":
            self.alerts.append(Alert(ts, str(r.get("kind")), str(r.get("severity")),
                                     str(r.get("role")), _crate(r), alert_sentence(r)))

    def report(self) -> BuildReport:
        b = self.build
        return BuildReport(
            id=str(b.get("id")), root_exe=b.get("root_exe"), cwd=b.get("cwd"), argv=self.argv,
            mode=self.mode, started=self.started or self.first, ended=self.ended,
            summary=self.summary,
            destinations=tuple(Destination(*(*k, *v)) for k, v in self.dests.items()),
            names=tuple(NameAsked(*(*k, n)) for k, n in self.names.items()),
            alerts=tuple(self.alerts))


def build_reports(records: Iterable[dict[str, Any]], *, build: str | None = None,
                  since: str | None = None) -> list[BuildReport]:
    """One report per build in the records, in the order they started; ``build`` keeps one
    id, ``since`` builds that started at or after it (see :func:`parse_since`)."""
    accs: dict[str, _Acc] = {}
    for r in records:
        ref = r.get("build")
        if not isinstance(ref, dict) or not isinstance(ref.get("id"), str):
            continue
        if build is not None and ref["id"] != build:
            continue
        with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
            # A record of a shape the daemon never writes is left out, not fatal.
            accs.setdefault(ref["id"], _Acc(ref)).add(r)
    out = [a.report() for a in accs.values()]
    if since is not None:
        out = [r for r in out if (r.started or "") >= since]
    return out


def render_json(reports: list[BuildReport]) -> str:
    """The reports as one JSON document: ``{"builds": [...]}``."""
    builds = []
    for r in reports:
        d = asdict(r)
        d["would_be_denied"] = r.would_be_denied
        for dest, obj in zip(r.destinations, d["destinations"], strict=True):
            obj["would_be_denied"] = dest.would_be_denied
        builds.append(d)
    return json.dumps({"builds": builds}, indent=2)


def _where(d: Destination) -> str:
    host = f"[{d.ip}]" if ":" in d.ip else d.ip
    return (f"{','.join(d.names)} ({host})" if d.names else host) + f":{d.port}"


def _verdict(d: Destination) -> str:
    if d.would_be_denied:
        return f"allowed, WOULD BE DENIED by enforce ({d.policy_decision})"
    if d.decision == "deny":
        return "denied"
    return "allowed" + (" (alert)" if d.policy_decision == "alert" else "")


def _headline(r: BuildReport) -> str:
    cmd = " ".join(r.argv) or (r.root_exe or "?")
    s = r.summary or {}
    total = sum(d.count for d in r.destinations)
    denied = sum(d.count for d in r.destinations if d.decision == "deny")
    parts = [f"mode {r.mode or '?'}"]
    if s:
        parts += [f"{s.get('duration_s')} s", f"{s.get('processes')} processes"]
    else:
        parts.append("still running or its end was not recorded")
    parts.append(f"{total} connection(s): {total - denied} allowed, {denied} denied, "
                 f"{r.would_be_denied} would be denied by enforce")
    if s.get("killed_by_rule"):
        parts.append(f"killed by rule {s['killed_by_rule']}")
    return f"{cmd} in {r.cwd or '?'}\n  " + ", ".join(parts)


def render_text(reports: list[BuildReport]) -> str:
    """For a terminal."""
    out = []
    for r in reports:
        out.append(f"build {r.id} ({r.started} .. {r.ended or 'running'}): {_headline(r)}")
        for a in r.alerts:
            out.append(f"  ALERT {a.severity} {a.kind}: {a.sentence}")
        for d in sorted(r.destinations, key=lambda d: (d.role, d.crate or "", d.ip)):
            out.append(f"  {d.role:<12} {d.crate or '-':<24} {_where(d)}/{d.protocol}  "
                       f"{_verdict(d)}  rule {d.rule}  x{d.count}")
        for n in sorted(r.names, key=lambda n: (n.role, n.name)):
            refused = " (would be refused by enforce)" if n.decision == "allow" \
                and n.policy_decision == "deny" else ""
            out.append(f"  dns {n.role:<8} {n.crate or '-':<24} {n.name} {n.qtype} "
                       f"{n.decision} {n.rcode}{refused} x{n.count}")
        out.append("")
    return "\n".join(out) if reports else "no builds in these events\n"


def md(text: object) -> str:
    """A markdown table cell or inline text that cannot break out of itself."""
    s = str(text).replace("\\", "\\\\").replace("\r", " ").replace("\n", " ")
    for ch in "|`*_[]<>#!":
        s = s.replace(ch, "\\" + ch)
    return s


def render_markdown(reports: list[BuildReport]) -> str:
    """For a CI job summary: a heading per build, then its alerts, connections and names."""
    out = []
    for r in reports:
        head, _, line = _headline(r).partition("\n  ")
        out += [f"## egress-monitor: build {md(r.id)}", "", f"{md(head)}", "", md(line), ""]
        if r.alerts:
            out += ["### Alerts", ""]
            out += [f"- **{md(a.severity)}** {md(a.kind)}: {md(a.sentence)}" for a in r.alerts]
            out.append("")
        out += ["### Connections", ""]
        if r.destinations:
            out += ["| role | crate | destination | protocol | decision | rule | count |",
                    "| --- | --- | --- | --- | --- | --- | --- |"]
            out += [f"| {md(d.role)} | {md(d.crate or '-')} | {md(_where(d))} | "
                    f"{md(d.protocol)} | {md(_verdict(d))} | {md(d.rule)} | {d.count} |"
                    for d in r.destinations]
        else:
            out.append("none")
        out.append("")
        if r.names:
            out += ["### DNS names asked", "", "| role | crate | name | type | answer | count |",
                    "| --- | --- | --- | --- | --- | --- |"]
            out += [f"| {md(n.role)} | {md(n.crate or '-')} | {md(n.name)} | {md(n.qtype)} | "
                    f"{md(n.decision)} {md(n.rcode)} | {n.count} |" for n in r.names]
            out.append("")
    return "\n".join(out) if reports else "egress-monitor: no builds in these events\n"


def render(reports: list[BuildReport], fmt: str) -> str:
    """``text``, ``markdown`` or ``json``."""
    if fmt == "json":
        return render_json(reports)
    return render_markdown(reports) if fmt == "markdown" else render_text(reports)
