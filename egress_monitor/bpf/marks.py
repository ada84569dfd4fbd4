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
    never equals the daemon's own verdict marks (0x454D0001/2), and leaves bits 22-29 free.
    ``fast`` (default bit 30; 0: none) is the bit the connect hook adds to a stamp whose SYN
    it sends ahead (``bpf/fast.py``): one bit outside the tag mask and the tgid field."""

    tag: int = 0x80000000
    tag_mask: int = 0x80000000
    tgid_bits: int = 22
    tgid_shift: int = 0
    fast: int = 0x40000000

    @property
    def tgid_mask(self) -> int:
        return ((1 << self.tgid_bits) - 1) << self.tgid_shift

    @property
    def reserved(self) -> int:
        return self.tag_mask | self.tgid_mask | self.fast

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
        if self.fast and (self.fast & (self.fast - 1) or self.fast & ~U32
                          or self.fast & (self.tag_mask | self.tgid_mask)):
            raise MarkLayoutError("the fast bit must be one bit outside the tag mask and the "
                                  "tgid field")
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
_NUM = r"(0x[0-9a-fA-F]+|\d+)"
_NFT_MASKED = re.compile(r"\bmeta mark (?:&|and) " + _NUM)
_NFT_OR = re.compile(r"\bmeta mark set meta mark (?:\||or) " + _NUM + r"\s*$")
_NFT_CHAIN = re.compile(r"^\s*chain (\S+) \{")
# Options that set or match the *packet* mark, by the match (-m) or target (-j) they belong to.
# The conntrack mark (-m connmark, CONNMARK --set-*) is a separate field and is not listed,
# except CONNMARK --restore-mark/--save-mark, which copy between the two.
_PACKET_MARK_OPTS = {
    "mark": {"--mark"},
    "MARK": {"--set-mark", "--set-xmark", "--or-mark", "--and-mark", "--xor-mark"},
    "TPROXY": {"--tproxy-mark"},
}


def _int(text: str) -> int:
    return int(text, 0) & U32


def _value_mask(text: str, op: str) -> int:
    """The bits an option's ``V[/M]`` touches: M when given, else V for or/xor/and-style
    operations, else all 32 bits (an exact match or a plain set compares or writes them all)."""
    value, _, mask = text.partition("/")
    if mask:
        return _int(mask)
    if op in ("--or-mark", "--xor-mark"):
        return _int(value)
    if op == "--and-mark":
        return ~_int(value) & U32
    return U32


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
    """Packet-mark bits set or matched by ``iptables-save`` rules, except in our own chains."""
    uses = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "-A" or words[1].startswith(own_prefix):
            continue
        module, mask = "", 0
        for i, word in enumerate(words):
            arg = words[i + 1] if i + 1 < len(words) else ""
            if word in ("-m", "-j", "--jump", "--match"):
                module = arg
            elif word in _PACKET_MARK_OPTS.get(module, ()) and re.fullmatch(
                    _NUM + r"(?:/" + _NUM + r")?", arg):
                mask |= _value_mask(arg, word)
            elif module == "CONNMARK" and word in ("--restore-mark", "--save-mark"):
                nfmask = re.search(r"--(?:nfmask|mask) " + _NUM, line)
                mask |= _int(nfmask.group(1)) if nfmask else U32
        if mask:
            uses.append(MarkUse(f"{source}: {line.strip()}", mask))
    return uses


def parse_nft_ruleset(text: str, own_prefix: str = "EGRESS-MON") -> list[MarkUse]:
    """Rules of ``nft list ruleset`` that read or write the packet mark, outside our chains
    (iptables-nft shows our own rules there too). ``meta mark & M`` and ``meta mark set meta
    mark | V`` touch M or V; any other use counts as all 32 bits."""
    uses, chain = [], ""
    for line in text.splitlines():
        m = _NFT_CHAIN.match(line)
        if m:
            chain = m.group(1)
            continue
        if chain.startswith(own_prefix) or not re.search(r"\bmeta mark\b", line):
            continue
        masked, ored = _NFT_MASKED.search(line), _NFT_OR.search(line)
        mask = _int(masked.group(1)) if masked else _int(ored.group(1)) if ored else U32
        uses.append(MarkUse(f"nft: {line.strip()}", mask))
    return uses


def conflicts(layout: MarkLayout, uses: list[MarkUse]) -> list[str]:
    """One message per use that overlaps our reserved bits (empty: safe to start)."""
    return [f"{u.source} uses mark bits {u.mask & layout.reserved:#010x} that are reserved "
            f"for build stamps ({layout.reserved:#010x}); reserve other bits (MarkLayout)"
            for u in uses if u.mask & layout.reserved]
