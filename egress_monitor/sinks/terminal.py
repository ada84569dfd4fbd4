"""Human lines on the operator's terminal: one per build start and end, alert and would-be
denial (``run`` on a TTY; the JSON events still go to the events file).

:func:`render` is pure: a record in, one line or None out. Every string in a record may come
from a build (argv, paths, names), so control characters are escaped: a build cannot move the
cursor, clear the screen or forge another line.
"""

from __future__ import annotations

import logging
from typing import IO, Any

from egress_monitor.sinks.alertmanager import summary as alert_summary

log = logging.getLogger(__name__)
REFUSING = ("deny", "kill-build")
MAX_FIELD = 200


def safe(value: object, limit: int = MAX_FIELD) -> str:
    """Printable text: control characters as ``\\xNN``, at most ``limit`` characters."""
    out = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in str(value))
    return out if len(out) <= limit else out[:limit - 3] + "..."


def who(record: dict[str, Any]) -> str:
    """``build-script of evil-dep 0.3.10 (curl, pid 42)``: the role, crate and process."""
    crate = record.get("crate") or {}
    text = str(record.get("role") or "other")
    if crate.get("name"):
        text += f" of {crate['name']} {crate.get('version') or ''}".rstrip()
    process = record.get("process") or {}
    if process.get("exe"):
        text += f" ({str(process['exe']).rsplit('/', 1)[-1]}, pid {process.get('pid')})"
    return text


def where(dst: dict[str, Any] | None, protocol: str | None = None) -> str:
    """``198.51.100.2:8080/tcp (attacker.example)``."""
    if not dst:
        return "?"
    ip = str(dst.get("ip"))
    text = (f"[{ip}]" if ":" in ip else ip) + f":{dst.get('port')}"
    if protocol:
        text += f"/{protocol}"
    names = dst.get("names") or []
    return text + (f" ({','.join(str(n) for n in names)})" if names else "")


def _size(n: object) -> str:
    if not isinstance(n, int) or n <= 0:
        return ""
    return f" {n} bytes" if n < 1000 else f" {n / 1000:.1f} kB"


def sentence(record: dict[str, Any]) -> str:
    """Who tried to send what to where, for an alert record."""
    kind = record.get("kind")
    ev = record.get("evidence") or {}
    dst = where(ev.get("dst"))
    if kind == "http_post":
        secrets = ev.get("secret_names") or []
        what = f"{ev.get('method')}{_size(ev.get('content_length'))}"
        if secrets:
            what += f" containing {', '.join(str(s) for s in secrets)}"
        verb = "sent" if not record.get("blocked") else "tried to send"
        return f"{who(record)} {verb} an HTTP {what} to {dst} (host {ev.get('host')}, " \
               f"path {ev.get('path')})"
    if kind == "upload":
        return f"{who(record)} sent{_size(ev.get('bytes_out'))} to {dst} in one flow " \
               f"(threshold {ev.get('threshold')} bytes)"
    if kind == "tls_unlisted_name":
        return f"{who(record)} opened TLS to {dst} asking for {ev.get('sni')}: {ev.get('reason')}"
    return alert_summary(record)


def _counts(summary: dict[str, Any]) -> str:
    parts = []
    policy = summary.get("policy_decisions_by_role") or {}
    for role, by_decision in sorted((summary.get("connections_by_role") or {}).items()):
        bits = [f"{n} {'allowed' if d == 'allow' else 'denied'}"
                for d, n in sorted(by_decision.items())]
        would = sum(n for a, n in (policy.get(role) or {}).items() if a in REFUSING) \
            - by_decision.get("deny", 0)
        if would > 0:
            bits.append(f"{would} would be denied")
        parts.append(f"{role} {', '.join(bits)}")
    return "; ".join(parts) or "none"


def render(record: dict[str, Any]) -> str | None:
    """The terminal line for a record, or None when it gets none."""
    rtype = record.get("type")
    build = record.get("build") or {}
    bid = safe(build.get("id"))
    if rtype == "build_start":
        cmd = " ".join(str(a) for a in record.get("argv") or []) or build.get("root_exe")
        return safe(f"build {bid} started: {cmd} in {build.get('cwd') or '?'} "
                    f"(via {record.get('via')})", 400)
    if rtype == "build_end":
        s = record.get("summary") or {}
        scripts = ", ".join(s.get("build_scripts") or []) or "none"
        line = (f"build {bid} ended after {s.get('duration_s')}s: {s.get('processes')} "
                f"process(es); build scripts: {scripts}; connections: {_counts(s)}")
        if s.get("would_be_denied"):
            line += f"; {s['would_be_denied']} would be denied in enforce mode"
        if s.get("killed_by_rule"):
            line += f"; killed by rule {s['killed_by_rule']}"
        return safe(line, 600)
    if rtype == "alert":
        rule = f", rule {record['rule']}" if record.get("rule") else ""
        return safe(f"ALERT {record.get('severity')} {record.get('kind')}: {sentence(record)} "
                    f"[build {bid}{rule}]", 600)
    decision, said = record.get("decision"), record.get("policy_decision")
    if decision == "allow" and said in REFUSING:
        if rtype == "connection":
            what = f"connected to {where(record.get('dst'), str(record.get('protocol')))}"
        elif rtype == "dns":
            what = f"resolved {(record.get('query') or {}).get('name')}"
        else:
            return None
        return safe(f"would deny (audit): {who(record)} {what}; enforce mode would refuse it "
                    f"(rule {record.get('rule')}) [build {bid}]", 600)
    return None


class TerminalSink:
    """Writes :func:`render`'s lines to a stream; a failing write is logged once, counted."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.failures = 0

    def write(self, record: dict[str, Any]) -> None:
        """The record's line, if it has one. Never raises: this runs on the verdict path."""
        try:
            line = render(record)
            if line is not None:
                self.stream.write(f"egress-monitor: {line}\n")
                self.stream.flush()
        except Exception as exc:  # a broken terminal or record must not stop verdicts
            self.failures += 1
            if self.failures == 1:
                log.error("terminal: %s (further failures are counted only)", exc)
