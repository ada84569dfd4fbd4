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
