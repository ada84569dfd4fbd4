"""Test hosts in throwaway network namespaces, and helpers to wait on what the daemon writes.

Addresses are TEST-NET-2 (198.51.100.0/24) and the documentation prefix 2001:db8::/32 only:
this machine's own interface sits on 192.0.2.0/24, and 203.0.113.0/24 is its package mirror.
Every namespace and link made here is removed by :meth:`TestHost.close`, even after a failure.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RECORDER = Path(__file__).with_name("recorder.py")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; raise with its stderr on failure."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def wait_until(what: str, predicate: Callable[[], Any], timeout: float = 30.0,
               interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of a file (a line still being written is left for later)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            out.append(json.loads(line))
    return out


class TestHost:
    """A namespace joined to the host by a veth pair, running the recording server."""

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, tag: str, index: int, workdir: Path) -> None:
        self.ns = f"emt-{tag}"
        self.host_if = f"emh-{tag}"[:15]
        self.peer_if = f"emp-{tag}"[:15]
        self.local_v4 = f"198.51.100.{4 * index + 1}"
        self.v4 = f"198.51.100.{4 * index + 2}"
        self.local_v6 = str(ipaddress.IPv6Address(f"2001:db8:51:{index:x}::1"))
        self.v6 = str(ipaddress.IPv6Address(f"2001:db8:51:{index:x}::2"))
        self.received = workdir / f"received-{tag}.jsonl"
        self._server: subprocess.Popen[str] | None = None
        self._up()

    def _up(self) -> None:
        try:
            sh("ip", "netns", "add", self.ns)
            sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
            sh("ip", "link", "set", self.peer_if, "netns", self.ns)
            sh("ip", "addr", "add", f"{self.local_v4}/30", "dev", self.host_if)
            sh("ip", "-6", "addr", "add", f"{self.local_v6}/64", "dev", self.host_if, "nodad")
            sh("ip", "link", "set", self.host_if, "up")
            ns = ("ip", "-n", self.ns)
            sh(*ns, "addr", "add", f"{self.v4}/30", "dev", self.peer_if)
            sh(*ns, "-6", "addr", "add", f"{self.v6}/64", "dev", self.peer_if, "nodad")
            sh(*ns, "link", "set", self.peer_if, "up")
            sh(*ns, "link", "set", "lo", "up")
            self._server = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, str(RECORDER),
                 "--out", str(self.received), "--v4", self.v4, "--v6", self.v6],
                stdout=subprocess.PIPE, text=True)
            assert self._server.stdout is not None
            line = self._server.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"test host server did not start: {line!r}")
        except BaseException:
            self.close()
            raise

    def requests(self) -> list[dict[str, Any]]:
        """What the server has received so far."""
        return read_jsonl(self.received)

    def close(self) -> None:
        """Stop the server and remove the namespace and link (each step on its own)."""
        if self._server is not None:
            self._server.terminate()
            try:
                self._server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "link", "del", self.host_if, check=False)


def leftover_state() -> list[str]:
    """Firewall rules and build cgroups the daemon should have removed."""
    found = []
    for tool in ("iptables", "ip6tables"):
        for line in sh(tool, "-w", "-S").stdout.splitlines():
            if "EGRESS" in line.upper() or "NFQUEUE" in line.upper():
                found.append(f"{tool}: {line}")
    from egress_monitor.enforce.cgroups import Cgroups

    found += [f"cgroup: {c}" for c in Cgroups.discover().build_cgroups()]
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def env_with_cargo() -> dict[str, str]:
    """The environment with rustup's bin directory on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path.home() / '.cargo' / 'bin'}:{env.get('PATH', '')}"
    env["CARGO_TERM_COLOR"] = "never"
    return env
