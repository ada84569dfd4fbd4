"""packet_diag dump datagrams and /proc/net/packet text."""

from egress_monitor.sources.packetdiag import parse_dump, parse_proc_packet

ALLOWED: tuple[type[BaseException], ...] = ()


def target(data: bytes) -> None:
    parse_dump(data)
    parse_dump(data, 3)
    parse_proc_packet(data)
