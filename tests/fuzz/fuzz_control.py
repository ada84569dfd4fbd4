"""A request line on the control socket."""

from egress_monitor.control import BadRequest, parse_request

ALLOWED: tuple[type[BaseException], ...] = (BadRequest,)
DICTIONARY = (b'{"op": "exec"}', b"[", b"{", b"}", b"]", b'"', b"\\u", b"1" * 4400, b"\n",
              b"\xff", b"NaN", b"1e999")


def target(data: bytes) -> None:
    parse_request(data)
