"""Datagrams from the nfnetlink_queue socket (held packets)."""

from egress_monitor.sources.nfqueue import decode_packets

ALLOWED: tuple[type[BaseException], ...] = ()


def target(data: bytes) -> None:
    decode_packets(data)
