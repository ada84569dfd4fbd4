"""The mark layout and the parsers that find the host's uses of mark bits."""

from __future__ import annotations

import random

import pytest

from egress_monitor.bpf.marks import (
    MarkLayout,
    MarkLayoutError,
    MarkUse,
    conflicts,
    parse_ip_rules,
    parse_iptables_save,
    parse_nft_ruleset,
)
from egress_monitor.enforce.rules import DENY_MARK, SINK_MARK

DEFAULT = MarkLayout()


def test_default_stamp_round_trips_and_never_equals_our_verdict_marks() -> None:
    for tgid in (1, 2, 4194303, 0x0D0001, 0x0D0002):
        mark = DEFAULT.stamp(tgid)
        assert DEFAULT.creator(mark) == tgid
        assert mark not in (DENY_MARK, SINK_MARK)
    assert DEFAULT.creator(0) is None and DEFAULT.creator(DENY_MARK) is None
    DEFAULT.validate(4194304)


def test_shifted_layout() -> None:
    layout = MarkLayout(tag=0x1, tag_mask=0x3, tgid_bits=22, tgid_shift=8)
    assert layout.stamp(5) == 0x501 and layout.creator(0x501) == 5
    assert layout.creator(0x502) is None
    assert layout.reserved == 0x3FFFFF03 | 0x40000000  # the fast bit too
    assert MarkLayout(tag=0x1, tag_mask=0x3, tgid_bits=22, tgid_shift=8,
                      fast=0).reserved == 0x3FFFFF03


@pytest.mark.parametrize("layout, pid_max, message", [
    (MarkLayout(tgid_bits=16), 4194304, "pid_max"),
    (MarkLayout(tag=0x1, tag_mask=0x1), 4194304, "overlaps"),
    (MarkLayout(tag=0x2, tag_mask=0x1 << 31), 4194304, "under its mask"),
    (MarkLayout(tag=0, tag_mask=0x1 << 31), 4194304, "a bit set"),
    (MarkLayout(tgid_shift=20), 4194304, "32 bits"),
    (MarkLayout(fast=0x80000000), 4194304, "fast bit"),  # the tag's own bit
    (MarkLayout(fast=0x1), 4194304, "fast bit"),  # inside the tgid field
    (MarkLayout(fast=0x30000000), 4194304, "fast bit"),  # two bits
    (MarkLayout(fast=1 << 32), 4194304, "fast bit"),
])
def test_unusable_layouts(layout: MarkLayout, pid_max: int, message: str) -> None:
    with pytest.raises(MarkLayoutError, match=message):
        layout.validate(pid_max)


@pytest.mark.parametrize("line, mask", [
    ("100:\tfrom all fwmark 0xca6c lookup 51820", 0xFFFFFFFF),
    ("5210:\tfrom all fwmark 0x80000/0xff0000 lookup main", 0xFF0000),
    ("32766:\tfrom all lookup main", None),
    ("32765:\tnot from all fwmark 0x0/0x1 lookup 7", 0x1),
])
def test_ip_rules(line: str, mask: int | None) -> None:
    uses = parse_ip_rules(line)
    assert [u.mask for u in uses] == ([] if mask is None else [mask])


@pytest.mark.parametrize("line, mask", [
    ("-A OUTPUT -m mark --mark 0x4000/0x4000 -j ACCEPT", 0x4000),
    ("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000", 0x4000),
    ("-A PREROUTING -j MARK --set-mark 0x1", 0xFFFFFFFF),
    ("-A X -j MARK --or-mark 0x80000", 0x80000),
    ("-A X -j MARK --and-mark 0xffff0000", 0xFFFF),
    ("-A X -j CONNMARK --restore-mark --nfmask 0xff --ctmask 0xff", 0xFF),
    ("-A X -j CONNMARK --restore-mark", 0xFFFFFFFF),
    ("-A X -j CONNMARK --set-xmark 0x100000/0x100000", None),  # conntrack mark only
    ("-A OUTPUT -m connmark --mark 0x100000/0x100000 -j EGRESS-MON-DATA", None),
    ("-A EGRESS-MON -m mark --mark 0x454d0001 -j REJECT", None),  # our own chain
    ("-A X -p tcp -j TPROXY --on-port 1 --tproxy-mark 0x1/0x1", 0x1),
    ("-A X -m comment --comment --mark -j ACCEPT", None),
])
def test_iptables_save(line: str, mask: int | None) -> None:
    uses = parse_iptables_save(f"*mangle\n{line}\nCOMMIT\n")
    assert [u.mask for u in uses] == ([] if mask is None else [mask])


def test_nft_ruleset_skips_our_chains_and_conntrack_marks() -> None:
    text = """table ip filter {
	chain EGRESS-MON {
		meta mark 0x454d0001 counter reject
	}
	chain ts-forward {
		meta mark & 0x00ff0000 == 0x00040000 accept
		meta mark set meta mark | 0x00040000
		ct mark and 0x100000 == 0x100000 accept
		meta mark set 0x1
	}
}
"""
    assert [u.mask for u in parse_nft_ruleset(text)] == [0xFF0000, 0x40000, 0xFFFFFFFF]


def test_conflicts_name_the_rule_and_the_bits() -> None:
    found = conflicts(DEFAULT, [MarkUse("ip -4 rule: fwmark 0xca6c", 0xFFFFFFFF),
                                MarkUse("ts", 0x3FC00000), MarkUse("fast", 0x40000000)])
    assert len(found) == 2  # bits 22-29 are free; bit 30 is the fast bit
    assert "fwmark 0xca6c" in found[0] and "0xc03fffff" in found[0]
    assert found[1].startswith("fast uses mark bits 0x40000000")


def test_parsers_are_total_on_any_text() -> None:
    rng = random.Random(7)
    alphabet = "-A mark --set-xmark 0x1/ fwmark meta & | chain { } \n CONNMARK -m -j"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet.split(" ")) + rng.choice(" /\n")
                       for _ in range(rng.randint(0, 40)))
        for parse in (parse_ip_rules, parse_iptables_save, parse_nft_ruleset):
            assert all(isinstance(u, MarkUse) for u in parse(text))


def test_source_nat_rules_that_rewrite_any_source() -> None:
    from egress_monitor.bpf.hostmarks import source_nat
    text = ("*nat\n:POSTROUTING ACCEPT [0:0]\n"
            "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n"
            "-A POSTROUTING -o eth0 -j MASQUERADE\n"
            "-A POSTROUTING -o eth1 -j SNAT --to-source 192.0.2.9\n"
            "-A OUTPUT -j DNAT --to-destination 192.0.2.1\nCOMMIT\n")
    assert source_nat(text) == ["-A POSTROUTING -o eth0 -j MASQUERADE",
                                "-A POSTROUTING -o eth1 -j SNAT --to-source 192.0.2.9"]
    assert source_nat("\x00garbage -A POSTROUTING") == []
