"""The head of an HTTP/1.x request, from the first data a client sends (pure).

Only the shape is kept: method, target, Host, Content-Length or chunked, a proxy's real
destination (``CONNECT host:port`` or an absolute URI), the header *names*, and the *names* of
secrets the visible body carries. Header values are never copied out of the payload; the
target is raw here, and :func:`egress_monitor.redact.target` drops its query values before it
is written anywhere.

Total: :func:`parse_request` returns a request, None (not HTTP/1.x), or raises
:class:`MalformedRequest` (an HTTP/1.x request line whose proxy destination cannot be read),
and nothing else, for any bytes; :func:`first_data_complete` and :func:`secret_names` never
raise. Work is linear in the input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_REQUEST_LINE = re.compile(rb"^([A-Z]{3,10}) (\S{1,4096}) HTTP/1\.[01]\r?\n")
_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)
_LENGTH = re.compile(r"[0-9]{1,18}", re.ASCII)


class MalformedRequest(ValueError):
    """An HTTP/1.x request whose proxy destination (CONNECT authority, absolute URI) cannot
    be read: the daemon cannot tell where it goes, so it is refused."""
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Variable names that hold credentials on CI machines, and the generic shape of such names.
KNOWN_NAMES = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN",
          "CARGO_REGISTRY_TOKEN", "GITHUB_TOKEN", "GH_TOKEN", "ACTIONS_RUNTIME_TOKEN",
          "ACTIONS_ID_TOKEN_REQUEST_TOKEN", "NPM_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS",
          "AZURE_CLIENT_SECRET", "SSH_AUTH_SOCK", "DOCKER_AUTH_CONFIG", "VAULT_TOKEN")
_NAME = re.compile(rb"\b([A-Z][A-Z0-9_]{2,63}(?:SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|"
                   rb"ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)[A-Z0-9_]{0,32})\b")
_KEY_BLOCK = re.compile(rb"-----BEGIN ((?:OPENSSH |RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY)-----")
_AWS_KEY_ID = re.compile(rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """What the first packet of a request shows."""

    method: str
    target: str  # path, or the absolute URI / authority a proxy is asked for
    host: str | None
    content_length: int | None
    chunked: bool
    body_seen: int  # body bytes in this packet
    secret_names: tuple[str, ...]
    proxy_host: str | None = None  # the real destination of a proxied request
    proxy_port: int | None = None
    header_names: tuple[str, ...] = ()  # lower-cased, in order, at most MAX_HEADER_NAMES

    @property
    def sends_body(self) -> bool:
        """A request that carries data: a body method, or any declared body."""
        return self.method in BODY_METHODS or bool(self.content_length) or self.chunked


def secret_names(data: bytes) -> tuple[str, ...]:
    """Names of credentials the bytes carry (variable names, key blocks), never values."""
    found: dict[str, None] = {}
    for known in KNOWN_NAMES:
        if known.encode() in data:
            found[known] = None
    for m in _NAME.finditer(data):
        found[m.group(1).decode()] = None
    for m in _KEY_BLOCK.finditer(data):
        found[m.group(1).decode()] = None
    if _AWS_KEY_ID.search(data):
        found["an AWS access key id"] = None
    return tuple(found)


_METHOD_PREFIX = re.compile(rb"^[A-Z]{1,10}(?: |$)")
MAX_FIRST_DATA = 4096
MAX_BODY_LOOK = 2048
MAX_HEADER_NAMES = 32


def request_line_pending(buf: bytes) -> bool:
    """Whether ``buf`` is the start of an HTTP request whose request line is not whole yet
    (blank lines, a method, part of a target): a relay request that may still come."""
    buf = buf.lstrip(b"\r\n")
    if len(buf) > MAX_FIRST_DATA or b"\n" in buf:
        return False
    return not buf or (bool(_METHOD_PREFIX.match(buf[:11])) and parse_request(buf) is None)


def first_data_complete(buf: bytes) -> bool:
    """Whether the first bytes a client sent are enough to judge: a whole TLS record, an
    HTTP head with up to ``MAX_BODY_LOOK`` bytes of its declared body, or anything else."""
    if len(buf) >= MAX_FIRST_DATA:
        return True
    buf = buf.lstrip(b"\r\n")
    if not buf:  # blank lines only, which servers and proxies skip before a request
        return False
    if buf[:1] == b"\x16":
        return len(buf) >= 5 and len(buf) >= 5 + int.from_bytes(buf[3:5], "big")
    if _METHOD_PREFIX.match(buf[:11]):
        _head, sep, body = buf.partition(b"\r\n\r\n")
        if not sep:
            return False
        try:
            request = parse_request(buf)
        except MalformedRequest:
            return True  # nothing more to wait for: it is refused as it is
        wanted = min(request.content_length or 0, MAX_BODY_LOOK) if request else 0
        return len(body) >= wanted
    return True


def parse_request(payload: bytes) -> HttpRequest | None:
    """The request head at the start of ``payload``, or None when it is not HTTP/1.x;
    raises MalformedRequest when its proxy destination cannot be read.

    Blank lines before the request line are skipped, as servers and proxies skip them.
    """
    payload = payload.lstrip(b"\r\n")
    m = _REQUEST_LINE.match(payload)
    if not m:
        return None
    method, target = m.group(1).decode(), m.group(2).decode("latin-1")
    head, sep, body = payload.partition(b"\r\n\r\n")
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            headers[name.strip().lower().decode("latin-1")[:64]] = \
                value.strip().decode("latin-1")
    length = headers.get("content-length", "")
    proxy_host: str | None = None
    proxy_port: int | None = None
    if method == "CONNECT":
        proxy_host, proxy_port = _authority(target)
    elif target.lower().startswith(("http://", "https://")):
        try:
            url = urlsplit(target)
            port = url.port  # raises ValueError when not a number in range
        except ValueError as exc:
            raise MalformedRequest(f"absolute URI: {exc}") from None
        proxy_host = (url.hostname or "").lower() or None
        if proxy_host is None:
            raise MalformedRequest("absolute URI without a host")
        proxy_port = port or (443 if url.scheme == "https" else 80)
    return HttpRequest(
        method=method, target=target[:512], host=headers.get("host"),
        content_length=int(length) if _LENGTH.fullmatch(length) else None,
        chunked="chunked" in headers.get("transfer-encoding", "").lower(),
        body_seen=len(body) if sep else 0,
        secret_names=secret_names(body if sep else b"") + tuple(
            n for n in secret_names(head) if n in ("an AWS access key id",)),
        proxy_host=proxy_host, proxy_port=proxy_port,
        header_names=tuple(headers)[:MAX_HEADER_NAMES])


def _authority(target: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` (port 443) of a CONNECT request."""
    if target.startswith("["):
        host, close, rest = target[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise MalformedRequest("CONNECT: an unclosed or trailing IPv6 literal")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = target.rpartition(":")
        host, port_text = (host, port_text_) if colon else (target, None)
        if ":" in host:
            raise MalformedRequest("CONNECT: an IPv6 address must be in brackets")
    if not host:
        raise MalformedRequest("CONNECT without a host")
    if port_text is None:
        return host.lower(), 443
    if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise MalformedRequest("CONNECT: the port is not a number 1-65535")
    return host.lower(), int(port_text)
