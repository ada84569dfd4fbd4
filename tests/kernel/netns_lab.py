"""The test "container": a network namespace whose only link leads to the test host, and a
cgroup for the "build" processes run inside it (shared by the netns kernel tests)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from egress_monitor.enforce.cgroups import Cgroups
from tests.kernel.netlab import TestHost, sh, wait_until

SENDER = r"""
import json, os, socket, sys
import dns.message, dns.query
v4, v6 = sys.argv[1], sys.argv[2]
timeout = float(os.environ.get("EM_TIMEOUT", "5"))
out = {}
for action in sys.argv[3:]:
    kind, _, arg = action.partition(":")
    family = socket.AF_INET6 if kind.endswith("6") else socket.AF_INET
    host = v6 if family == socket.AF_INET6 else v4
    try:
        if kind.startswith("udp"):
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.settimeout(min(timeout, 1.5))
            s.sendto(arg.encode(), (host, 5353))
            out[action] = "echo" if s.recv(100) == arg.encode() else "other"
        elif kind.startswith("tcp"):
            s = socket.create_connection((host, 8080), timeout=timeout)
            s.sendall(f"POST {arg} HTTP/1.0\r\nContent-Length: 1\r\n\r\nx".encode())
            out[action] = "ok" if s.recv(100).startswith(b"HTTP/1.0 200") else "cut-off"
        elif kind.startswith("dns"):  # dnsu4 / dnst4 / dnsu6: a query to the host's port 53
            query = dns.message.make_query(arg, "A")
            ask = dns.query.tcp if kind.startswith("dnst") else dns.query.udp
            answer = ask(query, host, timeout=timeout)
            out[action] = [r.address for rrset in answer.answer for r in rrset]
    except (socket.timeout, dns.exception.Timeout):
        out[action] = "timeout"
    except ConnectionResetError:
        out[action] = "reset"
    except OSError as e:
        out[action] = type(e).__name__
print(json.dumps(out))
"""


@dataclass
class Lab:
    """The namespace (``ns``, mounted at ``path``), the build's cgroup, the test host."""

    ns: str
    path: str
    cgroup: str
    cgroup_dir: str
    host: TestHost

    def inside(self, *argv: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace and in the build's cgroup (from its first
        instruction: the shell moves itself before exec)."""
        return subprocess.run(
            ["sh", "-c", f'echo $$ > {self.cgroup_dir}/cgroup.procs && exec "$@"', "sh",
             "ip", "netns", "exec", self.ns, *argv],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, **(env or {})})

    def send(self, *actions: str, python: str = sys.executable,
             env: dict[str, str] | None = None) -> dict[str, Any]:
        """The sender's outcome for each action (see SENDER), run by ``python``."""
        result = self.inside(python, "-c", SENDER, self.host.v4, self.host.v6, *actions,
                             env=env)
        assert result.returncode == 0, result.stderr
        out: dict[str, Any] = json.loads(result.stdout)
        return out

    def ns_sh(self, *argv: str) -> str:
        return sh("ip", "netns", "exec", self.ns, *argv).stdout

    def leftovers(self) -> list[str]:
        """Our state left in the namespace: rules, bound queues, listening sockets."""
        found = [f"{tool}: {line}" for tool in ("iptables-save", "ip6tables-save")
                 for line in self.ns_sh(tool).splitlines()
                 if "EGRESS" in line or "NFQUEUE" in line]
        queues = self.ns_sh("cat", "/proc/net/netfilter/nfnetlink_queue").strip()
        if queues:
            found.append(f"nfnetlink_queue: {queues}")
        found += [f"socket: {line}" for line in self.ns_sh("ss", "-H", "-l", "-n", "-u",
                                                             "-t").splitlines()]
        return found

    def lo_up(self) -> bool:
        return "UP" in self.ns_sh("ip", "-o", "link", "show", "lo").split(">")[0]


@contextlib.contextmanager
def open_lab(test_host: TestHost, suffix: str = "") -> Iterator[Lab]:
    """A fresh namespace holding the host end of ``test_host``'s veth, and a cgroup; both
    removed on the way out, failure or not (``suffix`` tells several labs apart)."""
    tag = f"{os.getpid() % 10000}{suffix}"
    ns = f"emt-nsb-{tag}"
    cgroups = Cgroups.discover()
    sh("ip", "netns", "add", ns)
    rel = None
    try:
        n = ("ip", "-n", ns)
        sh("ip", "link", "set", test_host.host_if, "netns", ns)
        sh(*n, "addr", "add", f"{test_host.local_v4}/30", "dev", test_host.host_if)
        sh(*n, "-6", "addr", "add", f"{test_host.local_v6}/64", "dev", test_host.host_if,
           "nodad")
        sh(*n, "link", "set", test_host.host_if, "up")
        rel = cgroups.create("/", f"emt-netns-{tag}")
        yield Lab(ns, f"/run/netns/{ns}", rel, cgroups.mount + rel, test_host)
    finally:
        if rel is not None:
            with contextlib.suppress(OSError):
                cgroups.kill(rel)
            wait_until("the test cgroup to empty", lambda: not cgroups.populated(rel),
                       timeout=10)
            cgroups.remove(rel)
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def lab(test_host: TestHost) -> Iterator[Lab]:
    """A fresh namespace holding the host end of the test host's veth, and a cgroup."""
    with open_lab(test_host) as made:
        yield made
