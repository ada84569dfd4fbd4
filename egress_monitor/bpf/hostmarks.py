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
