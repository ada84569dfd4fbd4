"""The daemon's local control socket: one JSON request line, one JSON answer line.

The socket file is mode 0600 in a 0700 directory, so only root can use it; the daemon takes
the caller's pid from SO_PEERCRED, never from the request, so a caller can only ask for
itself to be made a build.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from typing import Any

DEFAULT_RUNTIME_DIR = "/run/egress-monitor"
SOCKET_NAME = "control.sock"
_MAX_REQUEST = 64 * 1024


class ControlError(RuntimeError):
    """The daemon could not be reached or refused the request."""


class BadRequest(ValueError):
    """A request line that is not a JSON object with an 'op' string."""


MAX_DEPTH = 16  # nesting of a request's JSON; deeper is refused before parsing


def peer_pid(conn: socket.socket) -> int:
    """The pid of the process on the other end of a unix socket."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", creds)[0]
    return pid


def listen(runtime_dir: str) -> socket.socket:
    """Bind the control socket (replacing a stale file) and listen, non-blocking."""
    os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
    os.chmod(runtime_dir, 0o700)
    path = os.path.join(runtime_dir, SOCKET_NAME)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def read_request(conn: socket.socket, timeout: float = 2.0) -> dict[str, Any]:
    """One request line from a connected client; raises BadRequest when malformed, OSError
    when the socket fails (a timeout included). ``timeout`` bounds the whole request, not
    each read: a client trickling a byte at a time cannot hold the daemon's loop."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data and len(data) < _MAX_REQUEST:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("control request not complete in time")
        conn.settimeout(left)
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return parse_request(data)


def parse_request(data: bytes) -> dict[str, Any]:
    """The request in the first line of ``data``; raises BadRequest, only, for anything that
    is not a JSON object with an 'op' string (bounded: at most ``_MAX_REQUEST`` bytes and
    ``MAX_DEPTH`` levels of nesting are read)."""
    line = data[:_MAX_REQUEST].split(b"\n", 1)[0]
    depth = 0
    for byte in line:  # a bound before json's recursion: brackets, strings aside, suffice
        if byte in b"[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise BadRequest(f"nested deeper than {MAX_DEPTH} levels")
        elif byte in b"]}":
            depth -= 1
    try:
        request = json.loads(line or b"null")
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and 4300-digit ints too
        raise BadRequest(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise BadRequest("a request is a JSON object with an 'op' string")
    return request


def send(conn: socket.socket, answer: dict[str, Any]) -> None:
    """Send one answer line."""
    conn.sendall(json.dumps(answer).encode() + b"\n")


def call(request: dict[str, Any], runtime_dir: str = DEFAULT_RUNTIME_DIR,
         timeout: float = 10.0) -> dict[str, Any]:
    """Send a request to the running daemon and return its answer."""
    path = os.path.join(runtime_dir, SOCKET_NAME)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        send(sock, request)
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except FileNotFoundError as exc:
        raise ControlError(f"egress-monitor is not running (no socket at {path})") from exc
    except ConnectionRefusedError as exc:
        raise ControlError(f"egress-monitor is not running (nobody listens on {path})") \
            from exc
    except PermissionError as exc:
        raise ControlError(f"permission denied on {path}: run as root") from exc
    except OSError as exc:
        raise ControlError(f"cannot talk to egress-monitor at {path}: {exc}") from exc
    finally:
        sock.close()
    if not data:
        raise ControlError("egress-monitor closed the connection without answering")
    answer = json.loads(data.split(b"\n", 1)[0])
    if not isinstance(answer, dict):
        raise ControlError("egress-monitor sent a malformed answer")
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "request refused")))
    return answer
