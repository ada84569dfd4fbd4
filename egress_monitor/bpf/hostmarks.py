"""Read the host's uses of packet marks (policy routing, firewall rules) to check ours against.

The only I/O half of the mark check: it runs ``ip rule``, ``iptables-save``/``ip6tables-save``
and, when installed, ``nft list ruleset``, and hands their text to the pure parsers in
``marks.py``. :func:`check` raises :class:`MarkConflict` with one line per overlap, or when a
tool the check needs cannot be run (we cannot judge the host, so we do not start).
"""

from __future__ import annotations

import shutil
import subprocess

from egress_monitor.bpf.marks import (
    MarkLayout,
    MarkUse,
    conflicts,
    parse_ip_rules,
    parse_iptables_save,
    parse_nft_ruleset,
)


class MarkConflict(RuntimeError):
    """Our reserved mark bits are used on this host, or the host's use could not be read."""


def _run(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MarkConflict(f"cannot check mark use: {' '.join(argv)}: {e}") from None
    if out.returncode != 0:
        raise MarkConflict(f"cannot check mark use: {' '.join(argv)}: {out.stderr.strip()}")
    return out.stdout


def host_uses() -> list[MarkUse]:
    """Every use of mark bits this host's routing and firewall rules make."""
    uses = []
    for family in ("-4", "-6"):
        uses += parse_ip_rules(_run(["ip", family, "rule", "show"]), f"ip {family} rule")
    for tool in ("iptables-save", "ip6tables-save"):
        uses += parse_iptables_save(_run([tool]), tool)
    if shutil.which("nft"):
        uses += parse_nft_ruleset(_run(["nft", "list", "ruleset"]))
    return uses


def check(layout: MarkLayout) -> None:
    """Raise :class:`MarkConflict` unless no rule on the host touches our reserved bits."""
    found = conflicts(layout, host_uses())
    if found:
        raise MarkConflict("refusing to start: " + "; ".join(found))


def source_nat(save_text: str) -> list[str]:
    """The ``-A POSTROUTING`` rules of an ``iptables-save -t nat`` text that rewrite the
    source of packets from any source address (SNAT/MASQUERADE without ``-s``): a build flow
    they rewrite leaves with a source the daemon's verdict key does not name, so the backstop
    drops it (closed, but legitimate traffic). Pure and total."""
    out = []
    for line in save_text.splitlines():
        words = line.split()
        if words[:2] == ["-A", "POSTROUTING"] and ("SNAT" in words or "MASQUERADE" in words) \
                and "-s" not in words and "--source" not in words:
            out.append(line.strip())
    return out


def host_source_nat() -> list[str]:
    """:func:`source_nat` of the host's IPv4 and IPv6 nat tables; empty when unreadable."""
    found = []
    for tool in ("iptables-save", "ip6tables-save"):
        try:
            found += source_nat(_run([tool, "-t", "nat"]))
        except MarkConflict:
            continue
    return found
