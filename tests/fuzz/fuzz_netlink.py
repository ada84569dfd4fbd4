"""Netlink framing: messages, attributes, NLMSG_ERROR payloads."""

from egress_monitor.sources.netlink import (
    NLMSG_ERROR,
    MalformedNetlink,
    attributes,
    error_code,
    error_seq,
    messages,
)

ALLOWED: tuple[type[BaseException], ...] = (MalformedNetlink,)


def target(data: bytes) -> None:
    attributes(data)
    attributes(data, 4)
    error_seq(data)
    for msg_type, _flags, body in messages(data):
        attributes(body, 4)
        if msg_type == NLMSG_ERROR:
            error_seq(body)
            error_code(body)
    error_code(data)
