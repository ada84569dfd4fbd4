"""The head of an HTTP/1.x request, from the first data a client sends (pure).

Only the shape is kept: method, target, Host, Content-Length or chunked, a proxy's real
destination (``CONNECT host:port`` or an absolute URI), the header *names*, and the *names* of
secrets the visible body carries. Header values are never copied out of the payload; the
target is raw here, and :func:`egress_monitor.redact.target` drops its query values before it
is written anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_REQUEST_LINE = re.compile(rb"^([A-Z]{3,10}) (\S{1,4096}) HTTP/1\.[01]\r?\n")
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
        request = parse_request(buf)
        wanted = min(request.content_length or 0, MAX_BODY_LOOK) if request else 0
        return len(body) >= wanted
    return True


def _number(text: str, limit: int) -> int | None:
    """An ASCII decimal of at most 19 digits and at most ``limit``, else None."""
    if not (0 < len(text) <= 19 and text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value <= limit else None


def parse_request(payload: bytes) -> HttpRequest | None:
    """The request head at the start of ``payload``, or None when it is not HTTP/1.x.

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
    proxy_host = proxy_port = None
    if method == "CONNECT":
        host, _, port = target.rpartition(":")
        proxy_host, proxy_port = host.strip("[]").lower(), _number(port, 65535) or 443
    elif target.lower().startswith(("http://", "https://")):
        scheme, _, rest = target.partition("://")
        authority = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
        where, has_port, digits = authority.rpartition(":") if not authority.endswith("]") \
            else (authority, "", "")
        proxy_host = (where if has_port else authority).strip("[]").lower() or None
        proxy_port = _number(digits, 65535) or (443 if scheme.lower() == "https" else 80)
    return HttpRequest(
        method=method, target=target[:512], host=headers.get("host"),
        content_length=_number(length, 1 << 62),
        chunked="chunked" in headers.get("transfer-encoding", "").lower(),
        body_seen=len(body) if sep else 0,
        secret_names=secret_names(body if sep else b"") + tuple(
            n for n in secret_names(head) if n in ("an AWS access key id",)),
        proxy_host=proxy_host, proxy_port=proxy_port,
        header_names=tuple(headers)[:MAX_HEADER_NAMES])
