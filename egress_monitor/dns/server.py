"""The resolver's I/O: listen on loopback (UDP and TCP, IPv4 and IPv6), forward upstream.

Runs an asyncio loop in a thread of its own. Every decision is the daemon's, through two
synchronous hooks (:class:`Hooks`): ``begin`` when a query arrives (answer now, or forward),
``complete`` when upstream answered (record what it said). ``complete`` returns before the
answer is sent, so the daemon knows the addresses before the build does. The hooks touch the
daemon's state, so they run on its main thread: ``submit`` hands each call to the main loop
(:class:`egress_monitor.mailbox.Mailbox`) and this thread awaits the result without blocking
other queries. A hook that fails gets the client SERVFAIL, never a forwarded query.

Upstream: the query's bytes go out unchanged but for a fresh random id, over UDP to each
upstream in turn (``timeout_s`` each); an answer with TC set is asked again over TCP, and the
full answer is given to the client if it fits the client's UDP size, else a truncated one so
the client asks again over TCP (through the same redirect, to this server).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from egress_monitor.dns.message import FLAG_TC, error_response, truncated, with_id
from egress_monitor.loopcall import call_in_loop

log = logging.getLogger(__name__)
SERVFAIL = 2
MAX_TCP_MESSAGE = 65535
T = TypeVar("T")
Submit = Callable[[str, Callable[[], Any]], "Future[Any]"]


@dataclass(frozen=True, slots=True)
class Plan:
    """What ``begin`` decided: ``respond`` now (a refusal, FORMERR), ``drop`` (no answer,
    and nothing forwarded: bytes that are not a query), or forward upstream."""

    respond: bytes | None
    context: Any = None
    client_id: int = 0
    udp_payload: int = 512
    drop: bool = False


class Hooks(Protocol):
    """The daemon's side of the resolver; both calls are made from the resolver thread."""

    def begin(self, wire: bytes, client: tuple[str, int], transport: str) -> Plan:
        """Decide on a query."""
        ...

    def complete(self, context: Any, response: bytes | None, upstream: str | None,
                 latency_s: float) -> None:
        """Record an upstream answer (None when every upstream failed)."""
        ...


def parse_upstream(value: str) -> tuple[str, int]:
    """``ADDR``, ``ADDR:PORT``, ``[V6]:PORT`` or a bare IPv6 address to (addr, port)."""
    if value.startswith("["):
        host, _, port = value[1:].partition("]")
        return host, int(port.lstrip(":") or 53)
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, int(port)
    return value, 53


def host_resolvers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The host's own resolvers, as the host sees them."""
    found = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    found.append((parts[1].split("%")[0], 53))
    except OSError:
        pass
    return found


class _Once(asyncio.DatagramProtocol):
    """Wait for one datagram with the expected id."""

    def __init__(self, msg_id: int) -> None:
        self.msg_id = msg_id
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) >= 12 and struct.unpack_from("!H", data)[0] == self.msg_id \
                and not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


class DnsServer:
    """The resolver thread."""

    def __init__(self, hooks: Hooks, port: int, upstreams: list[tuple[str, int]],
                 timeout_s: float = 2.0, on_error: Callable[[str], None] | None = None,
                 submit: Submit | None = None) -> None:
        self.hooks = hooks
        self._submit = submit
        self.port = port
        self.upstreams = upstreams
        self.timeout_s = timeout_s
        self._on_error = on_error or (lambda _kind: None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._extra: dict[socket.socket, Callable[[], None]] = {}  # the loop's thread only

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Bind every listener and return; raises if one cannot be bound."""
        self._thread = threading.Thread(target=self._run, name="dns", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self) -> None:
        """Close the listeners and end the thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        closers: list[Callable[[], None]] = []
        try:
            for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
                transport, _ = await self._loop.create_datagram_endpoint(
                    lambda: _UdpListener(self), local_addr=(host, self.port), family=family)
                closers.append(transport.close)
                server = await asyncio.start_server(self._tcp_client, host, self.port,
                                                    family=family)
                closers.append(server.close)
        except BaseException as exc:
            self._startup_error = exc
            for close in closers:
                close()
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        for close in [*closers, *self._extra.values()]:
            close()
        self._extra.clear()

    # -- extra sockets (another network namespace's loopback: enforce/netns.py) ------------
    def add_socket(self, sock: socket.socket) -> None:
        """Also answer queries arriving on ``sock``: a bound UDP socket or a listening TCP
        socket, made anywhere (a gate makes them inside another network namespace). Returns
        once it is served; from then on the server owns it (:meth:`remove_socket`, or
        :meth:`stop`, closes it). Raises RuntimeError when the server is not running."""
        self._in_loop(self._adopt(sock))

    def remove_socket(self, sock: socket.socket) -> None:
        """Stop serving ``sock`` and close it (a socket never added: nothing)."""
        self._in_loop(self._drop(sock))

    def _in_loop(self, coro: Coroutine[Any, Any, None]) -> None:
        call_in_loop(self._loop, self._stop, coro, "DNS server")

    async def _adopt(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if sock.type == socket.SOCK_DGRAM:
            transport, _ = await loop.create_datagram_endpoint(lambda: _UdpListener(self),
                                                               sock=sock)
            self._extra[sock] = transport.close
        else:
            server = await asyncio.start_server(self._tcp_client, sock=sock)
            self._extra[sock] = server.close

    async def _drop(self, sock: socket.socket) -> None:
        close = self._extra.pop(sock, None)
        if close is not None:
            close()

    # -- serving ---------------------------------------------------------------------------
    async def answer(self, wire: bytes, client: tuple[str, int], transport: str) -> bytes | None:
        """The bytes to send back for one query (None: send nothing)."""
        plan: Plan = await self._on_owner(lambda: self.hooks.begin(wire, client, transport))
        if plan.respond is not None or plan.drop:
            return plan.respond
        started = time.monotonic()
        response, upstream = await self._forward(wire)
        latency = time.monotonic() - started
        await self._on_owner(lambda: self.hooks.complete(plan.context, response, upstream,
                                                         latency))
        if response is None:
            return error_response(wire, SERVFAIL)
        response = with_id(response, plan.client_id)
        if transport == "udp" and len(response) > plan.udp_payload:
            return truncated(response)
        return response

    async def _on_owner(self, call: Callable[[], T]) -> T:
        """Run a hook on the thread that owns the daemon's state, and await its result."""
        if self._submit is None:
            return call()
        result: T = await asyncio.wrap_future(self._submit("dns_query", call))
        return result

    async def _forward(self, wire: bytes) -> tuple[bytes | None, str | None]:
        for host, port in self.upstreams:
            name = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
            msg_id = secrets.randbelow(65536)
            query = with_id(wire, msg_id)
            try:
                response = await self._udp(query, msg_id, (host, port))
                if struct.unpack_from("!H", response, 2)[0] & FLAG_TC:
                    response = await self._tcp(query, msg_id, (host, port))
                return response, name
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                self._on_error("upstream")
                log.warning("upstream %s failed: %s", name, exc or type(exc).__name__)
        return None, None

    async def _udp(self, query: bytes, msg_id: int, addr: tuple[str, int]) -> bytes:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _Once(msg_id), remote_addr=addr)
        try:
            transport.sendto(query)
            return await asyncio.wait_for(proto.answer, self.timeout_s)
        finally:
            transport.close()

    async def _tcp(self, query: bytes, msg_id: int, addr: tuple[str, int]) -> bytes:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), self.timeout_s)
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            length = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2),
                                                                 self.timeout_s))[0]
            response = await asyncio.wait_for(reader.readexactly(length), self.timeout_s)
            if struct.unpack_from("!H", response)[0] != msg_id:
                raise ValueError("TCP answer with another id")
            return response
        finally:
            writer.close()

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    length = struct.unpack("!H", await asyncio.wait_for(
                        reader.readexactly(2), 10))[0]
                    wire = await asyncio.wait_for(reader.readexactly(length), 10)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                try:
                    response = await self.answer(wire, (peer[0], peer[1]), "tcp")
                except Exception as exc:  # one query must never take the resolver down
                    _failed(peer, exc)
                    response = error_response(wire, SERVFAIL)
                if response is None:
                    return
                writer.write(struct.pack("!H", len(response)) + response)
                await writer.drain()
        finally:
            writer.close()


def _failed(client: Any, exc: Exception) -> None:
    # A hook's failure was logged with its traceback (rate-limited) and counted where it ran,
    # on the main loop; this line only says which client got SERVFAIL for it.
    log.warning("DNS query from %s answered SERVFAIL: %s", client, exc or type(exc).__name__)
    log.debug("DNS query failure", exc_info=exc)


class _UdpListener(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(data, (addr[0], addr[1])))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            response = await self.server.answer(data, addr, "udp")
        except Exception as exc:  # one query must never take the resolver down
            _failed(addr, exc)
            response = error_response(data, SERVFAIL)
        if response is not None and self.transport is not None:
            self.transport.sendto(response, addr)
