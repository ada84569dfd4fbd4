"""parse_flow and tcp_payload on raw IPv4/IPv6 packets (the queue's payloads)."""

from egress_monitor.packets import MalformedPacket, parse_flow, tcp_payload

ALLOWED: tuple[type[BaseException], ...] = (MalformedPacket,)


def target(data: bytes) -> None:
    tcp_payload(data)
    parse_flow(data)
