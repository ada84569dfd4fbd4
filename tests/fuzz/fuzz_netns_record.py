"""The record of namespaces a stopped daemon left refusing (read by cleanup)."""

from egress_monitor.netns_record import parse_record

ALLOWED: tuple[type[BaseException], ...] = ()
DICTIONARY = (b" ", b"\n", b"4026531840", b"18446744073709551615", b"\r", b"\xff", b"-1")


def target(data: bytes) -> None:
    parse_record(data.decode("utf-8", "surrogateescape"))
