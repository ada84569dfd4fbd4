"""Alerting against the real programs: promtool on the rules, a real Alertmanager."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.netlab import DaemonHandle, TestHost, wait_until

REPO = Path(__file__).resolve().parents[2]


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing (make test installs Debian's prometheus)"
    rules = REPO / "deploy" / "prometheus"
    check = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=rules,
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0 and "SUCCESS: 6 rules found" in check.stdout, check.stdout
    test = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=rules,
                          capture_output=True, text=True, timeout=60, check=False)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Alertmanager:
    """Debian's prometheus-alertmanager on loopback, with a throwaway config and storage."""

    def __init__(self, tmp: Path) -> None:
        self.binary = shutil.which("prometheus-alertmanager")
        assert self.binary, "prometheus-alertmanager is missing (make test installs it)"
        self.port = _port()
        self.tmp = tmp
        (tmp / "am.yml").write_text("route:\n  receiver: blackhole\nreceivers:\n"
                                    "  - name: blackhole\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.runs += 1
        storage = self.tmp / f"data-{self.runs}"  # a restart that forgot everything
        self.proc = subprocess.Popen(
            [str(self.binary), f"--config.file={self.tmp / 'am.yml'}",
             f"--storage.path={storage}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--cluster.listen-address="], stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "am.log", "ab"))  # noqa: SIM115 - the child keeps it

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False
        wait_until("Alertmanager to be ready", ready, timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def alerts(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as r:
            data: list[dict[str, Any]] = json.load(r)
            return data


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    am = Alertmanager(tmp_path)
    am.start()
    try:
        yield am
    finally:
        am.stop()


def attempt(daemon: DaemonHandle, host: TestHost) -> None:
    """A build (exec) that tries to POST to the test host; the sinkhole cuts it off."""
    out = subprocess.run(daemon.exec_argv(sys.executable, "-c", f"""
import socket
s = socket.create_connection(("{host.v4}", 8080), timeout=5)
s.sendall(b"POST /x HTTP/1.1\\r\\nHost: h\\r\\nContent-Length: 5\\r\\n\\r\\nhello")
try:
    print("answered" if s.recv(100) else "cut off")
except ConnectionResetError:
    print("cut off")
"""), capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert out == "cut off"


def test_alertmanager_receives_alerts_and_keeps_receiving_after_a_restart(
        daemon: DaemonHandle, test_host: TestHost, alertmanager: Alertmanager,
        tmp_path: Path) -> None:
    daemon.restart("--alertmanager", alertmanager.url, "--runner-name", "test-runner-1",
                   policy="version: 1\nmode: enforce\n")
    attempt(daemon, test_host)
    first = wait_until("the alert in Alertmanager", alertmanager.alerts, timeout=30)
    labels = first[0]["labels"]
    assert labels["alertname"] == "EgressMonitorBlockedAttempt"
    assert (labels["severity"], labels["runner"], labels["kind"], labels["role"]) == \
        ("critical", "test-runner-1", "blocked_attempt", "other")
    assert first[0]["annotations"]["summary"] == (
        f"blocked: other tried to POST 5 bytes to {test_host.v4}:8080, refused by rule "
        "default:other")
    assert test_host.requests() == []
    assert daemon.metric("egress_monitor_exfil_attempts_total", kind="blocked_attempt",
                         role="other") == 1

    # Alertmanager goes away; an alert raised meanwhile is retried until it is back.
    alertmanager.stop()
    attempt(daemon, test_host)
    wait_until("a failed delivery", lambda: daemon.metric(
        "egress_monitor_alert_delivery_failures_total") >= 1, timeout=30)
    alertmanager.start()  # empty storage: only a re-delivery can fill it
    again = wait_until("the alert after the restart", alertmanager.alerts, timeout=60)
    assert [a["labels"]["kind"] for a in again] == ["blocked_attempt"]
    assert again[0]["labels"]["build"] != labels["build"]  # the second attempt's own build
