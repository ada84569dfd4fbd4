"""A build's DNS query: parse it, and build the refusals the guard would send for it."""

from egress_monitor.dns.message import MalformedMessage, error_response, parse_query

ALLOWED: tuple[type[BaseException], ...] = (MalformedMessage,)


def target(data: bytes) -> None:
    error_response(data, 2)  # SERVFAIL / FORMERR paths must never raise
    error_response(data, 3, blocked=True)
    parse_query(data)
