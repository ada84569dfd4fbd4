"""The SNI of a TLS ClientHello (None for anything else: no error is documented)."""

from egress_monitor.detect.tls import client_hello_sni

ALLOWED: tuple[type[BaseException], ...] = ()


def target(data: bytes) -> None:
    client_hello_sni(data)
