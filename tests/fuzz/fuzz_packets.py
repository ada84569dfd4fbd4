"""parse_flow, tcp_payload, tcp_seq and is_tcp_syn on raw IPv4/IPv6 packets (the queue's
payloads)."""

from egress_monitor.packets import MalformedPacket, is_tcp_syn, parse_flow, tcp_payload, tcp_seq

ALLOWED: tuple[type[BaseException], ...] = (MalformedPacket,)


def target(data: bytes) -> None:
    tcp_payload(data)
    seq = tcp_seq(data)
    assert seq is None or 0 <= seq < 1 << 32
    is_tcp_syn(data)
    parse_flow(data)
