"""Answers of sock_diag to an exact socket lookup."""

from egress_monitor.sources.sockdiag import parse_inode

ALLOWED: tuple[type[BaseException], ...] = ()


def target(data: bytes) -> None:
    parse_inode(data)
    parse_inode(data, 1)
