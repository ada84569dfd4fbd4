"""The judgement of a build flow's first data (pure): what it shows, what it names, whether
enforce mode refuses it, and the alerts to raise.

Inputs are the bytes gathered so far, whether the packet budget is spent, the names the
flow's address was resolved from, the process's policy subject, the policy, the mode, and the
build's secrets found in the bytes. In order:

- a secret's value (``secret_value``; refused in enforce mode);
- a relay request, judged on the destination it names as if the build connected there: an
  HTTP ``CONNECT`` or absolute-URI request (after any blank lines) or a SOCKS4, 4a or 5
  request (``blocked_attempt`` in enforce mode, else ``policy_alert``, with ``proxied_to``);
- an HTTP request carrying a body off the host (``http_post``);
- a TLS ClientHello whose SNI the policy does not allow, or that differs from the names the
  address was resolved from (``blocked_attempt`` with the SNI in enforce mode, else
  ``tls_unlisted_name``);
- an HTTP/1.x request whose proxy destination cannot be read (``rule: malformed-request``;
  refused in enforce mode);
- when the budget is spent on what is still the beginning of a relay request (a request line
  or a SOCKS exchange written in more pieces than are inspected), the daemon cannot judge it:
  refused in enforce mode (``blocked_attempt``, ``reason: unjudged``), a warning otherwise.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from egress_monitor import redact
from egress_monitor.alerts import Severity
from egress_monitor.detect.http import (
    HttpRequest,
    MalformedRequest,
    parse_request,
    request_line_pending,
)
from egress_monitor.detect.secrets import SecretHit
from egress_monitor.detect.socks import MORE, parse_socks
from egress_monitor.detect.tls import client_hello_sni
from egress_monitor.policy.engine import Subject, decide, decide_name, is_loopback
from egress_monitor.policy.schema import Policy

Found = tuple[str, Severity, dict[str, Any]]  # kind, severity, evidence of one alert


@dataclass(slots=True)
class Judgement:
    """Whether to refuse the packet that completed the first data, and the alerts."""

    refuse: bool = False
    alerts: list[Found] = field(default_factory=list)


def _request(data: bytes) -> tuple[HttpRequest | None, str | None]:
    """The HTTP request in the bytes, and why its destination cannot be read (if it can't)."""
    try:
        return parse_request(data), None
    except MalformedRequest as exc:
        return None, str(exc)


def shape(data: bytes, hit: SecretHit | None = None) -> dict[str, Any]:
    """What first bytes show, as shape only: request head fields (the path without its query
    values, the query's and headers' names) and secret names, or SNI. ``hit`` adds the
    variables whose values the bytes carry."""
    out: dict[str, Any] = {"bytes_seen": len(data)}
    request, malformed = _request(data)
    if malformed is not None:
        out["malformed"] = malformed
    elif request is not None:
        path, query = redact.target(request.target)
        names = dict.fromkeys(request.secret_names)
        names.update(dict.fromkeys(hit.names if hit else ()))
        out.update(method=request.method, host=request.host, path=path, query_names=query,
                   headers=list(request.header_names),
                   content_length=request.content_length, chunked=request.chunked,
                   secret_names=list(names))
    else:
        socks = parse_socks(data)
        if socks is not None and socks != MORE:
            out["socks"] = socks.version
        sni = client_hello_sni(data)
        if sni is not None:
            out["sni"] = sni
    return out


def pending(data: bytes) -> bool:
    """Whether the bytes are the unfinished start of a relay request (wait for more)."""
    return request_line_pending(data) or parse_socks(data) == MORE


def relay_target(data: bytes) -> tuple[str, int] | None:
    """The destination a proxy request names (HTTP or SOCKS), or None."""
    request, malformed = _request(data)
    if malformed is not None:
        return None
    if request is not None:
        if request.proxy_host and request.proxy_port is not None:
            return request.proxy_host, request.proxy_port
        return None
    socks = parse_socks(data)
    if socks is None or socks == MORE:
        return None
    return socks.host, socks.port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def judge(data: bytes, *, spent: bool, names: tuple[str, ...], dst: dict[str, Any],
          subject: Subject, policy: Policy, enforce: bool, hit: SecretHit | None) -> Judgement:
    """See the module docstring. ``dst`` is the evidence's destination object."""
    out = Judgement()
    found = {**shape(data, hit), "dst": dst}
    if hit is not None:
        out.refuse = enforce
        out.alerts.append(("secret_value", "critical", {
            "protocol": "tcp", **found, "secret_names": list(hit.names),
            "encodings": list(hit.encodings)}))
    target = relay_target(data)
    request, malformed = _request(data)
    if malformed is not None:
        # A request whose destination cannot be read cannot be judged: refused (enforce).
        out.refuse = out.refuse or enforce
        out.alerts.append(("blocked_attempt" if enforce else "policy_alert",
                           "critical" if enforce else "warning",
                           {**found, "rule": "malformed-request"}))
    elif target is not None:
        host, port = target
        ip = host if _is_ip(host) else None
        verdict = decide(policy, subject, ip=ip, port=port, protocol="tcp",
                         names=() if ip else (host,))
        if verdict.action in ("deny", "kill-build"):
            out.refuse = out.refuse or enforce
            out.alerts.append(("blocked_attempt" if enforce else "policy_alert",
                               "critical" if enforce else "warning",
                               {**found, "rule": verdict.rule,
                                "proxied_to": f"{host}:{port}"}))
    elif spent and pending(data):
        out.refuse = out.refuse or enforce
        out.alerts.append(("blocked_attempt" if enforce else "policy_alert",
                           "critical" if enforce else "warning",
                           {**found, "rule": "unjudged", "reason": "unjudged",
                            "why": "a relay request still unfinished when the inspection "
                                   "budget was spent"}))
    if request is not None and request.sends_body and not is_loopback(dst.get("ip")):
        out.alerts.append(("http_post", "critical" if found["secret_names"] else "warning",
                           found))
    sni = client_hello_sni(data) if request is None and malformed is None else None
    if sni is not None:
        verdict = decide_name(policy, subject, sni)
        unlisted = verdict.action not in ("allow", "alert")
        mismatch = bool(names) and sni not in names
        if unlisted or mismatch:
            reason = "not allowed by the policy" if unlisted else \
                "differs from the names the address was resolved from"
            evidence = {"sni": sni, "dst": dst, "reason": reason,
                        "rule": verdict.rule if unlisted else "sni-mismatch"}
            if enforce:
                out.refuse = True
                out.alerts.append(("blocked_attempt", "critical",
                                   {"protocol": "tls", **evidence}))
            else:
                out.alerts.append(("tls_unlisted_name", "critical" if unlisted else "warning",
                                   evidence))
    return out
