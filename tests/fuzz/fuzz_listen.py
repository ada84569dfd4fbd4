"""HOST:PORT listen addresses (command line and config)."""

from egress_monitor.config import ListenError, parse_listen

ALLOWED: tuple[type[BaseException], ...] = (ListenError,)
DICTIONARY = (b":", b"[", b"]", b"\xc2\xb2", "\u0663".encode(), b"9" * 4400)


def target(data: bytes) -> None:
    parse_listen(data.decode("utf-8", "surrogateescape"))
