"""Answers of ctnetlink to a counter look-up."""

from egress_monitor.sources.conntrack import ConntrackError, parse_counters

ALLOWED: tuple[type[BaseException], ...] = (ConntrackError,)


def target(data: bytes) -> None:
    try:
        parse_counters(data, 1)
    finally:
        parse_counters(data)
