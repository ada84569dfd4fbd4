"""The HTTP request head of a flow's first data (and its completeness check)."""

from egress_monitor.detect.http import MalformedRequest, first_data_complete, parse_request

ALLOWED: tuple[type[BaseException], ...] = (MalformedRequest,)
DICTIONARY = (b"CONNECT ", b"GET ", b"POST ", b" HTTP/1.1\r\n", b"\r\n", b"\r\n\r\n",
              b"http://", b"https://", b"[::1]", b":", b"Host: ", b"Content-Length: ",
              b"Transfer-Encoding: chunked", b"\xb2", b"AWS_SECRET_ACCESS_KEY=", b"%")


def target(data: bytes) -> None:
    first_data_complete(data)
    parse_request(data)
