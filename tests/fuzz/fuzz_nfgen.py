"""nftables generation answers and commit notifications (NETLINK_NETFILTER)."""

from egress_monitor.sources.nfgen import parse_commits, parse_generation

ALLOWED: tuple[type[BaseException], ...] = ()


def target(data: bytes) -> None:
    parse_commits(data)
    parse_generation(data)
    parse_generation(data, 9)
