"""A build's gate inside another network namespace: our rules, a queue and loopback listeners.

A process in a network namespace of its own (a container, ``ip netns exec``, ``nsenter
--net``) sends through that namespace's netfilter hooks, where the host's chains, queue
sockets, DNS redirect and sinkhole do not exist. :class:`NetnsGate` puts them there: the same
ruleset :class:`~egress_monitor.enforce.firewall.Firewall` renders on the host, applied by
``iptables-restore`` running inside the namespace; an NFQUEUE socket of that namespace (queue
numbers are per namespace, so a build keeps its number); UDP and TCP listeners on the
namespace's own ``127.0.0.1`` and ``::1`` for the resolver and the sinkhole, which then serve
them from the daemon's namespace (upstream queries still leave from the host). Until a gate is
open, the kernel's backstop (``bpf/``) drops a member's packets there: nothing leaves unjudged.

How we get in: Python 3.11 has no ``os.setns``, so a short-lived thread calls ``setns(2)``
(ctypes) with ``CLONE_NEWNET`` and ends. Only that thread moves; what it creates belongs to the
namespace: sockets (a socket keeps its namespace for life) and children (``iptables-restore``
forked from it inherits its namespace). The daemon's own threads never change namespace.

Lifetime: the gate holds a descriptor on the namespace, and its sockets each hold a
reference, so the namespace outlives its last process and its name until :meth:`close`; a
namespace whose processes are gone and whose name was removed therefore closes cleanly.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from egress_monitor.enforce.firewall import Firewall, Runner, run_command
from egress_monitor.enforce.rules import BuildRule, MarkGate
from egress_monitor.sources.nfqueue import QueueSocket

log = logging.getLogger(__name__)
T = TypeVar("T")
CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71  # asm-generic/socket.h (Linux 5.14)
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = struct.Struct("16sh22x")  # struct ifreq: name, then ifr_flags in the union
ACCT = "/proc/sys/net/netfilter/nf_conntrack_acct"  # per namespace, read by the thread's
_libc = ctypes.CDLL(None, use_errno=True)


class Listener(Protocol):
    """A server that can take extra sockets (the resolver, the sinkhole)."""

    def add_socket(self, sock: socket.socket) -> None:
        """Serve ``sock`` from now on (it owns it)."""
        ...

    def remove_socket(self, sock: socket.socket) -> None:
        """Stop serving ``sock`` and close it."""
        ...


def run_in(ns_fd: int, call: Callable[[], T]) -> T:
    """``call()`` on a fresh thread that first joined the network namespace ``ns_fd``;
    returns its result or raises its exception. The thread ends right after."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            if _libc.setns(ns_fd, CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"setns(CLONE_NEWNET): {os.strerror(code)}")
            box["value"] = call()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=body, name="netns-enter", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def open_netns(netns: str | int) -> int:
    """A descriptor of the namespace: ``netns`` is a path (``/proc/PID/ns/net``,
    ``/run/netns/NAME``) or a descriptor (duplicated). Raises OSError."""
    fd = os.dup(netns) if isinstance(netns, int) else os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    os.set_inheritable(fd, False)
    return fd


def inode_of(ns_fd: int) -> int:
    """The namespace's inode number: what ``/proc/PID/ns/net`` links to (``net:[INODE]``),
    and what events name it by."""
    return os.fstat(ns_fd).st_ino


def cookie_of(ns_fd: int) -> int:
    """The namespace's cookie, as ``bpf_get_netns_cookie`` gives it (``SO_NETNS_COOKIE`` on a
    socket made inside): never reused, unlike an inode number."""
    def get() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return int(struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE,
                                                          8))[0])
    return run_in(ns_fd, get)


def runner_in(ns_fd: int) -> Runner:
    """A :class:`Firewall` runner whose commands run inside the namespace."""
    def run(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        return run_in(ns_fd, lambda: run_command(argv, stdin))
    return run


def _raise_loopback() -> bool:
    """Bring ``lo`` up (our listeners and REDIRECT need it); True when it was down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = _IFREQ.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0)))[1]
        if flags & IFF_UP:
            return False
        fcntl.ioctl(s, SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | IFF_UP))
        return True


def _lower_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = _IFREQ.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags & ~IFF_UP))


def _swap_acct(value: str) -> str | None:
    """Set this namespace's ``nf_conntrack_acct`` (the data chain's connbytes needs it);
    returns what it was (None: conntrack has no such switch here)."""
    try:
        with open(ACCT) as f:
            before = f.read().strip()
        if before != value:
            with open(ACCT, "w") as f:
                f.write(value)
        return before
    except FileNotFoundError:
        return None


def _listeners(dns_port: int | None, sink_port: int | None
               ) -> tuple[list[socket.socket], list[socket.socket]]:
    """Bound loopback sockets: DNS (UDP and TCP) and sinkhole (TCP), IPv4 and IPv6 (IPv6 left
    out when the namespace has no ``::1``, as with IPv6 disabled: no IPv6 leaves it either)."""
    dns: list[socket.socket] = []
    sink: list[socket.socket] = []
    try:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            for port, kind, out in ((dns_port, socket.SOCK_DGRAM, dns),
                                    (dns_port, socket.SOCK_STREAM, dns),
                                    (sink_port, socket.SOCK_STREAM, sink)):
                if port is None:
                    continue
                s = socket.socket(family, kind)
                try:
                    if kind == socket.SOCK_STREAM:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((host, port))
                    if kind == socket.SOCK_STREAM:
                        s.listen(128)
                except OSError as e:
                    s.close()
                    if family == socket.AF_INET6 and e.errno == errno.EADDRNOTAVAIL:
                        break
                    raise
                s.setblocking(False)
                out.append(s)
    except BaseException:
        for s in dns + sink:
            s.close()
        raise
    return dns, sink


@dataclass
class NetnsGate:
    """One namespace's gate; make it with :meth:`open`, end it with :meth:`close`."""

    fd: int
    inode: int
    cookie: int
    firewall: Firewall
    queue: QueueSocket | None = None
    dns_sockets: list[socket.socket] = field(default_factory=list)
    sink_sockets: list[socket.socket] = field(default_factory=list)
    _served: list[tuple[Listener, socket.socket]] = field(default_factory=list)
    _lo_raised: bool = False
    _acct_before: str | None = None
    _rules_in: bool = False
    closed: bool = False

    @classmethod
    def open(cls, netns: str | int, builds: Iterable[BuildRule] = (),
             dns_port: int | None = None, sink_port: int | None = None,
             dns: Listener | None = None, sinkhole: Listener | None = None,
             mark_gate: MarkGate | None = None) -> NetnsGate:
        """Gate the namespace ``netns`` (a path or a descriptor) for ``builds`` (and, with
        ``mark_gate``, stamped packets no build rule took, on its queue, as on the host).

        In order, so that each piece is there before traffic can need it: ``lo`` up, the
        queue socket bound to every build's queue, the listeners (handed to ``dns`` and
        ``sinkhole`` when given), conntrack accounting on, and last the rules. Raises
        (OSError, FirewallError, NetlinkError) having undone every step.
        """
        fd = open_netns(netns)
        try:
            gate = cls(fd, inode_of(fd), cookie_of(fd),
                       Firewall(runner=runner_in(fd), resolver_port=dns_port,
                                sink_port=sink_port, mark_gate=mark_gate, late_tcp=True))
        except BaseException:
            os.close(fd)
            raise
        try:
            rules = list(builds)
            gate._lo_raised = run_in(fd, _raise_loopback)
            gate.queue = run_in(fd, QueueSocket)
            for number in sorted(gate._queues(rules)):
                gate.queue.bind_queue(number)
            gate.dns_sockets, gate.sink_sockets = run_in(fd, lambda: _listeners(dns_port,
                                                                               sink_port))
            for server, socks in ((dns, gate.dns_sockets), (sinkhole, gate.sink_sockets)):
                if server is None:
                    continue
                for s in socks:
                    server.add_socket(s)
                    gate._served.append((server, s))
            gate._acct_before = run_in(fd, lambda: _swap_acct("1"))
            gate._rules_in = True  # from here on close() must try to remove rules
            gate.firewall.install(rules)
        except BaseException:
            gate.close()
            raise
        return gate

    def _queues(self, rules: list[BuildRule]) -> set[int]:
        gate = self.firewall.mark_gate
        return {r.queue for r in rules if not r.refuse} | ({gate.queue} if gate else set())

    def sync(self, builds: Iterable[BuildRule]) -> None:
        """Hold exactly the rules and queues of ``builds``: new queues are bound before the
        rules that feed them, and queues no rule feeds any more are unbound after."""
        rules = list(builds)
        assert self.queue is not None and not self.closed
        wanted = self._queues(rules)
        for number in sorted(wanted - self.queue.bound):
            self.queue.bind_queue(number)
        self.firewall.sync(rules)
        for number in sorted(self.queue.bound - wanted):
            self.queue.unbind_queue(number)

    def close(self, refusing: Iterable[BuildRule] = ()) -> list[str]:
        """Remove the rules, the listeners, the queue socket and the namespace descriptor,
        each step on its own; returns the errors met (logged too). Safe to call twice.

        With ``refusing`` (the daemon stops while those builds still run), the rules are not
        removed but left refusing exactly those builds' new flows, as the host's are: with
        the daemon gone there is no backstop either, and nothing may pass unjudged."""
        if self.closed:
            return []
        self.closed = True
        errors: list[str] = []

        def step(what: str, call: Callable[..., object], *args: object) -> None:
            try:
                call(*args)
            except Exception as e:  # every other step still runs
                log.error("netns %d gate close: %s: %s", self.inode, what, e)
                errors.append(f"{what}: {e}")

        refused = list(refusing)
        if self._rules_in and refused:
            step("refusing rules", self.firewall.sync, refused, True)
        elif self._rules_in:
            errors += self.firewall.remove()
        if self._acct_before not in (None, "1"):
            before = self._acct_before
            step("conntrack accounting", run_in, self.fd, lambda: _swap_acct(before))
        for server, s in reversed(self._served):
            step("listener", server.remove_socket, s)
        self._served.clear()
        for s in self.dns_sockets + self.sink_sockets:
            with contextlib.suppress(OSError):
                s.close()
        if self.queue is not None:
            step("queue socket", self.queue.close)
        if self._lo_raised:
            step("loopback", run_in, self.fd, _lower_loopback)
        step("namespace descriptor", os.close, self.fd)
        return errors
