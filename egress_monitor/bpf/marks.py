"""The socket-mark layout that carries a build member's creator tgid, and conflict checks.

``sock_create`` stamps a member's socket with ``sk_mark = tag | (tgid << shift)``. Every
packet of the socket carries it (``skb->mark`` starts as ``sk_mark``), so NFQUEUE hands the
creator to the daemon in ``NFQA_MARK`` even after the socket closed or its process exited.

Marks are shared with policy routing (``ip rule fwmark``) and other users of marks (Docker,
Tailscale, WireGuard, kube-proxy, Cilium). The reserved bits are configurable; at start the
daemon compares them with the host's ``ip rule`` fwmark rules and with the marks its
iptables/nftables rules set or match, and refuses to start on an overlap
(:func:`conflicts`). Pure: the parsers take the tools' text output and are total.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

U32 = 0xFFFFFFFF


class MarkLayoutError(ValueError):
    """The layout is not usable (overlapping fields, too narrow for pid_max)."""


@dataclass(frozen=True)
class MarkLayout:
    """``tag`` under ``tag_mask`` says "stamped by us"; the tgid sits in ``tgid_bits`` at
    ``tgid_shift``. The default (0x80000000 | tgid in bits 0-21) keeps bit 31 set, so a stamp
    never equals the daemon's own verdict marks (0x454D0001/2), and leaves bits 22-30 free."""

    tag: int = 0x80000000
    tag_mask: int = 0x80000000
    tgid_bits: int = 22
    tgid_shift: int = 0

    @property
    def tgid_mask(self) -> int:
        return ((1 << self.tgid_bits) - 1) << self.tgid_shift

    @property
    def reserved(self) -> int:
        return self.tag_mask | self.tgid_mask

    def validate(self, pid_max: int) -> None:
        """Raise :class:`MarkLayoutError` unless every tgid below ``pid_max`` fits exactly."""
        if not 0 < self.tgid_bits <= 32 or self.tgid_shift + self.tgid_bits > 32:
            raise MarkLayoutError("the tgid field does not fit 32 bits")
        if self.tag & ~self.tag_mask or not self.tag_mask or self.tag_mask & ~U32:
            raise MarkLayoutError("the tag must be a non-empty value under its mask")
        if not self.tag:
            raise MarkLayoutError("the tag must have a bit set (an unstamped mark is 0)")
        if self.tag_mask & self.tgid_mask:
            raise MarkLayoutError("the tag mask overlaps the tgid field")
        if pid_max - 1 > (1 << self.tgid_bits) - 1:
            raise MarkLayoutError(f"pid_max {pid_max} needs more than {self.tgid_bits} tgid bits")

    def stamp(self, tgid: int) -> int:
        return self.tag | ((tgid << self.tgid_shift) & self.tgid_mask)

    def creator(self, mark: int) -> int | None:
        """The creator tgid a packet's mark carries, or None if we did not stamp it."""
        if mark & self.tag_mask != self.tag:
            return None
        return (mark & self.tgid_mask) >> self.tgid_shift


@dataclass(frozen=True)
class MarkUse:
    """Someone else's use of mark bits: where it was seen, and which bits it touches."""

    source: str
    mask: int


_FWMARK = re.compile(r"\bfwmark (0x[0-9a-fA-F]+|\d+)(?:/(0x[0-9a-fA-F]+|\d+))?")
# iptables-save: --set-mark/--set-xmark/--or-mark/--and-mark/--xor-mark/--mark V[/M]
_IPT = re.compile(r"--(set-xmark|set-mark|or-mark|and-mark|xor-mark|mark|restore-mark|"
                  r"save-mark)(?: (0x[0-9a-fA-F]+|\d+)(?:/(0x[0-9a-fA-F]+|\d+))?)?")
_NFT = re.compile(r"\bmeta mark\b|(?<!ct )\bmark set\b")


def _int(text: str) -> int:
    return int(text, 0) & U32


def parse_ip_rules(text: str, source: str = "ip rule") -> list[MarkUse]:
    """fwmark selectors of ``ip rule show`` / ``ip -6 rule show`` output."""
    uses = []
    for line in text.splitlines():
        for m in _FWMARK.finditer(line):
            value = _int(m.group(1))
            mask = _int(m.group(2)) if m.group(2) else U32
            if value or mask != U32:
                uses.append(MarkUse(f"{source}: {line.strip()}", mask))
    return uses


def parse_iptables_save(text: str, source: str = "iptables", own_prefix: str = "EGRESS-MON"
                        ) -> list[MarkUse]:
    """Marks set or matched by ``iptables-save`` rules, except in our own chains.

    ``CONNMARK --or-mark`` etc. change the conntrack mark, a separate field, unless
    ``--restore-mark`` copies it into the packet: those count only with ``-j CONNMARK
    --restore-mark`` (mask as given, else all bits). A rule that names no mask counts as all
    32 bits (an exact match compares every bit).
    """
    uses = []
    for line in text.splitlines():
        if not line.startswith("-A ") or line.split()[1].startswith(own_prefix):
            continue
        connmark_target = "-j CONNMARK" in line
        for m in _IPT.finditer(line):
            op = m.group(1)
            if connmark_target and op not in ("restore-mark",):
                continue
            if op in ("restore-mark", "save-mark"):
                mask = U32
                nfmask = re.search(r"--(?:nf)?mask (0x[0-9a-fA-F]+|\d+)", line)
                if nfmask:
                    mask = _int(nfmask.group(1))
            elif m.group(2) is None:
                continue
            elif m.group(3):
                mask = _int(m.group(3))
            else:
                mask = U32 if op in ("set-mark", "set-xmark", "mark") else _int(m.group(2))
            uses.append(MarkUse(f"{source}: {line.strip()}", mask))
    return uses


def parse_nft_ruleset(text: str) -> list[MarkUse]:
    """nftables rules that read or write the packet mark (bits are not parsed: all of them)."""
    return [MarkUse(f"nft: {line.strip()}", U32) for line in text.splitlines()
            if _NFT.search(line)]


def conflicts(layout: MarkLayout, uses: list[MarkUse]) -> list[str]:
    """One message per use that overlaps our reserved bits (empty: safe to start)."""
    return [f"{u.source} uses mark bits {u.mask & layout.reserved:#010x} that are reserved "
            f"for build stamps ({layout.reserved:#010x}); reserve other bits (MarkLayout)"
            for u in uses if u.mask & layout.reserved]
