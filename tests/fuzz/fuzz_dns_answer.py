"""An upstream's DNS answer: its addresses, and its truncation for a UDP client."""

from egress_monitor.dns.message import MalformedMessage, parse_answer, truncated, with_id

ALLOWED: tuple[type[BaseException], ...] = (MalformedMessage,)


def target(data: bytes) -> None:
    truncated(data)
    with_id(data, 0xBEEF)
    parse_answer(data, "index.crates.io")
