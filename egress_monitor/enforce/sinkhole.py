"""Where refused TCP connections of builds go in enforce mode: accept, read, record, close.

The nat table redirects a refused connection here (``SINK_MARK``). The process connects, sends
its request head or TLS ClientHello, and is cut off (a reset) as soon as that is read, or after
``timeout_s``. The original destination comes from ``SO_ORIGINAL_DST``; the bytes go to the
daemon's hook, which keeps only their shape. Nothing is forwarded anywhere, and nothing is kept.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from egress_monitor.detect.http import MAX_FIRST_DATA, first_data_complete
from egress_monitor.loopcall import call_in_loop

log = logging.getLogger(__name__)
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
Hook = Callable[[tuple[str, int], tuple[str, int] | None, bytes], None]


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """Where a redirected connection was headed, or None."""
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack_from("!H", raw, 2)[0]
            return str(ipaddress.IPv4Address(raw[4:8])), port
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return str(ipaddress.IPv6Address(raw[8:24])), port
    except OSError:
        return None


class Sinkhole:
    """The sinkhole thread; ``hook(peer, original_dst, first_bytes)`` is called per attempt."""

    def __init__(self, port: int, hook: Hook, timeout_s: float = 2.0) -> None:
        self.port = port
        self.hook = hook
        self.timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._extra: dict[socket.socket, asyncio.Server] = {}  # the loop's thread only
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                        name="sinkhole", daemon=True)

    def start(self) -> None:
        """Listen on loopback (both families); raises when a port cannot be bound."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Close and end the thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=5)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        servers = []
        try:
            for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
                servers.append(await asyncio.start_server(self._client, host, self.port,
                                                          family=family))
        except BaseException as exc:
            self._error = exc
            for s in servers:
                s.close()
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        for s in [*servers, *self._extra.values()]:
            s.close()
        self._extra.clear()

    def add_socket(self, sock: socket.socket) -> None:
        """Also take connections on ``sock``, a listening TCP socket made anywhere (a gate
        makes one on another network namespace's loopback; ``SO_ORIGINAL_DST`` reads that
        namespace's conntrack). From then on the sinkhole owns it. Raises RuntimeError when
        the sinkhole is not running."""
        self._in_loop(self._adopt(sock))

    def remove_socket(self, sock: socket.socket) -> None:
        """Stop taking connections on ``sock`` and close it."""
        self._in_loop(self._drop(sock))

    def _in_loop(self, coro: Coroutine[Any, Any, None]) -> None:
        call_in_loop(self._loop, self._stop, coro, "sinkhole")

    async def _adopt(self, sock: socket.socket) -> None:
        self._extra[sock] = await asyncio.start_server(self._client, sock=sock)

    async def _drop(self, sock: socket.socket) -> None:
        server = self._extra.pop(sock, None)
        if server is not None:
            server.close()

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        dst = original_dst(sock) if sock is not None else None
        data = b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            while len(data) < MAX_FIRST_DATA and not (data and first_data_complete(data)):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                chunk = await asyncio.wait_for(reader.read(MAX_FIRST_DATA - len(data)),
                                               remaining)
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, ConnectionError):
            pass
        try:
            self.hook((peer[0], peer[1]), dst, data)
        except Exception:  # one attempt must never take the sinkhole down
            log.exception("recording a blocked attempt from %s", peer)
        finally:
            if sock is not None:  # end with a reset: the process sees its attempt fail
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
