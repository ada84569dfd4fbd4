"""Fuzz target: SOCKS4/4a/5 client bytes."""

from __future__ import annotations

from egress_monitor.detect.socks import parse_socks

ALLOWED: tuple[type[BaseException], ...] = ()


def target(data: bytes) -> None:
    parse_socks(data)
