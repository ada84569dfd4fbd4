"""The build attacks the daemon's own input: it must keep running and keep refusing."""

from __future__ import annotations

import subprocess
import sys

from tests.kernel.netlab import DaemonHandle, TestHost, Workspace

ENFORCE_LOOPBACK_ONLY = "version: 1\nmode: enforce\nloopback: allow\n"

# First data a build can send on a flow the policy allows: each shape once crashed a parser
# somewhere (the team's fuzzing and attack notes), or is meant to.
HOSTILE = r'''
import socket, threading, time
lsock = socket.socket(); lsock.bind(("127.0.0.1", 0)); lsock.listen(16)
port = lsock.getsockname()[1]
def serve():
    while True:
        c, _ = lsock.accept()
        c.settimeout(2)
        try:
            c.recv(65536)
        except OSError:
            pass
        c.close()
threading.Thread(target=serve, daemon=True).start()
shapes = [
    b"GET http://[::1 HTTP/1.1\r\nHost: x\r\n\r\n",                      # invalid IPv6 URL
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \u00b2\u00b3\r\n\r\n".encode(),
    b"\xff\xfe\xfd GET / HTTP/1.1\r\nHost: \xc3\x28\r\n\r\n",           # not UTF-8
    b"CONNECT a:99999999999999999999999 HTTP/1.1\r\n\r\n",
    b"GET http://x:-1/ HTTP/1.1\r\nHost: x:99999\r\n\r\n",
    b"\x16\x03\x01\xff\xff\x01\xff\xff\xff\x03\x03" + b"\xff" * 64,     # lying TLS lengths
    b"\x16\x03\x01\x00\x05\x01\x00\x00\x01",                             # truncated hello
    b"\r\n" * 2000,
]
for data in shapes:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(data)
    time.sleep(0.05)  # let each shape be its own first data, not one stream
    s.close()
'''


def test_malformed_first_data_on_an_allowed_flow_cannot_stop_the_gate(
        daemon: DaemonHandle, test_host: TestHost, workspace: Workspace) -> None:
    daemon.restart(policy=ENFORCE_LOOPBACK_ONLY)
    (workspace.root / "hostile.py").write_text(HOSTILE)
    workspace.cargo_build(test_host, "py=hostile,post4")

    alert = daemon.wait_event("the blocked POST", lambda e: e["type"] == "alert"
                              and e["kind"] == "blocked_attempt"
                              and e["evidence"]["dst"]["ip"] == test_host.v4)
    assert alert["role"] == "build-script" and alert["crate"]["name"] == "evil-dep"
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
    # Every parser met its input with a value or its own error: nothing was a bug.
    assert daemon.metric("egress_monitor_internal_errors_total") == 0, daemon.log()
    # The nine loopback connections the script opened (the listener's own closing packets,
    # which conntrack cannot place, are judged as well and are not counted here).
    loopback = [e for e in daemon.events("connection") if e["dst"]["ip"] == "127.0.0.1"
                and e["role"] == "build-script"]
    assert len(loopback) == 9 and all(e["decision"] == "allow" for e in loopback)
    assert test_host.requests() == []  # the POST never reached the host
    # Still judging: the next build's connection is refused like the first.
    out = subprocess.run(daemon.exec_argv(sys.executable, "-c", f"""
import socket
try:
    s = socket.create_connection(("{test_host.v4}", 8080), timeout=5)
    s.sendall(b"POST /again HTTP/1.0\\r\\nContent-Length: 1\\r\\n\\r\\nx")
    print("answered" if s.recv(100) else "cut off")
except OSError:
    print("cut off")
"""), capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert out == "cut off"
    assert daemon.proc.poll() is None
    assert test_host.requests() == []
