"""What ``egress-monitor status`` shows (pure): the daemon's recent memory and its text form.

The daemon keeps three short, bounded lists from the records it writes: the last alerts and
enforced refusals, the last would-be refusals of audit mode, and the last finished builds.
:func:`remember` files one record; :func:`render` turns the daemon's answer into lines.
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from egress_monitor.builds import Build

REFUSING = ("deny", "kill-build")


def counts(build: Build) -> dict[str, int]:
    """A live build's connections so far: ``allow``, ``deny`` and ``would_deny``."""
    out: dict[str, int] = {"allow": 0, "deny": 0}
    for (_role, decision), n in build.connections.items():
        out[decision] = out.get(decision, 0) + n
    out["would_deny"] = build.would_be_denied()
    return out


def destination(record: dict[str, Any]) -> dict[str, Any] | None:
    """Where a connection or alert record went: its ``dst``, else its evidence's."""
    dst = record.get("dst") or (record.get("evidence") or {}).get("dst")
    return dst if isinstance(dst, dict) else None


def _entry(record: dict[str, Any], kind: str | None) -> dict[str, Any]:
    return {"ts": record["ts"], "type": record["type"], "kind": kind,
            "role": record.get("role"), "crate": record.get("crate"),
            "dst": destination(record), "rule": record.get("rule"),
            "build": (record.get("build") or {}).get("id")}


def remember(record: dict[str, Any], *, alerts: deque[dict[str, Any]],
             would_deny: deque[dict[str, Any]], builds: deque[dict[str, Any]]) -> None:
    """File one written record into the status lists it belongs to (most belong to none)."""
    rtype = record.get("type")
    if rtype == "alert":
        alerts.append(_entry(record, record.get("kind")))
    elif rtype == "connection" and record.get("decision") == "deny":
        alerts.append(_entry(record, "refused"))
    elif rtype == "connection" and record.get("policy_decision") in REFUSING:
        would_deny.append(_entry(record, "would_deny"))
    elif rtype == "build_end":
        build = record.get("build") or {}
        summary = record.get("summary") or {}
        total: dict[str, int] = {}
        for by_decision in (summary.get("connections_by_role") or {}).values():
            for decision, n in by_decision.items():
                total[decision] = total.get(decision, 0) + n
        builds.append({**build, "ended": record["ts"],
                       "duration_s": summary.get("duration_s"),
                       "processes": summary.get("processes"),
                       "connections": {"allow": total.get("allow", 0),
                                       "deny": total.get("deny", 0),
                                       "would_deny": summary.get("would_be_denied", 0)},
                       "killed_by_rule": summary.get("killed_by_rule")})


def where(dst: dict[str, Any] | None) -> str:
    """``ip:port (names)``, IPv6 in brackets; empty when unknown."""
    if not dst:
        return ""
    ip = str(dst.get("ip"))
    host = f"[{ip}]" if ":" in ip else ip
    names = ",".join(dst.get("names") or [])
    return f"{host}:{dst.get('port')}" + (f" ({names})" if names else "")


def _conns(c: dict[str, int]) -> str:
    text = f"connections {c.get('allow', 0)} allowed, {c.get('deny', 0)} denied"
    if c.get("would_deny"):
        text += f", {c['would_deny']} would be denied by enforce"
    return text


def _event_line(a: dict[str, Any]) -> str:
    crate = a["crate"]["name"] if a.get("crate") else "-"
    return (f"  {a['ts']}  {a.get('kind') or a['type']}  {a.get('role') or '-'}  {crate}  "
            f"{where(a.get('dst'))}  {a.get('rule') or ''}  build {a.get('build') or '-'}"
            ).rstrip()


def render(answer: dict[str, Any]) -> str:
    """The text of ``egress-monitor status`` for the daemon's answer."""
    lines = [f"egress-monitor: running (pid {answer['pid']}, up {answer['uptime_s']:.0f}s), "
             f"mode {answer['mode']}, runner {answer['runner']}"]
    pol = answer["policy"]
    lines.append(f"policy: {pol['source']} (digest {pol['digest'][:12]}, "
                 f"{pol['rules']} rule(s))")
    lines.append(f"builds active: {len(answer['builds'])}")
    for b in answer["builds"]:
        lines.append(f"  {b['id']}  {os.path.basename(b['root_exe'] or '?')}  "
                     f"{b['cwd'] or '?'}  age {b['age_s']:.0f}s  {b['processes']} "
                     f"process(es)  {_conns(b['connections'])}")
    finished = answer.get("finished", [])
    lines.append(f"builds finished (last {len(finished)}):")
    for b in reversed(finished):
        killed = f"  killed by rule {b['killed_by_rule']}" if b.get("killed_by_rule") else ""
        lines.append(f"  {b['id']}  {os.path.basename(b.get('root_exe') or '?')}  "
                     f"{b.get('cwd') or '?'}  ended {b['ended']}  {b.get('duration_s')}s  "
                     f"{_conns(b['connections'])}{killed}")
    lines.append(f"last alerts and refusals: {len(answer['last_alerts'])}")
    lines.extend(_event_line(a) for a in answer["last_alerts"])
    would = answer.get("would_deny", [])
    if would:
        lines.append(f"last would-be denials (audit): {len(would)}")
        lines.extend(_event_line(a) for a in would)
    return "\n".join(lines)
