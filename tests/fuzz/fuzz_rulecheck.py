"""iptables-save text as the rule guard reads it (rules a build may have written itself)."""

from egress_monitor.rulecheck import differences, parse_save, unsound

ALLOWED: tuple[type[BaseException], ...] = ()
CHAINS = frozenset({"EGRESS-MON", "EGRESS-MON-DATA", "EGRESS-MON-NAT"})
JUMPS = {"filter": CHAINS - {"EGRESS-MON-NAT"}, "nat": frozenset({"EGRESS-MON-NAT"})}


def target(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    views = parse_save(text, 4, CHAINS)
    differences(views, parse_save(text[: len(text) // 2], 4, CHAINS))
    unsound(views, {("filter", "EGRESS-MON"): 7, ("nat", "EGRESS-MON-NAT"): 6}, JUMPS)
