"""Identity from the kernel, tried as a build would: early sockets, short lives, borrowed names.

A toolchain cargo here is a copy of this Python registered with ``--cargo`` (the daemon knows
toolchain files by identity, so a copy counts only because it is registered); build scripts are
further copies placed where cargo puts build scripts. Each test checks what the test host
received, not only what the daemon wrote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.netlab import DaemonHandle, TestHost, copied_toolchain, env_with_cargo, wait_until

PYTHON = os.path.realpath(sys.executable)
ALLOW_CARGO = """\
version: 1
mode: {mode}
groups:
  lab: {{cidrs: [{net}]}}
rules:
  - {{id: cargo-lab, role: cargo, to: [lab], action: allow}}
  - {{id: victim-exception, role: build-script, crate: victim, to: [lab], action: allow}}
"""


@dataclass
class Toolchain:
    """A registered cargo (a copy of Python) and a build script where cargo would put one."""

    cargo: Path
    build_script: Path
    root: Path


@pytest.fixture
def toolchain(tmp_path: Path) -> Toolchain:
    cargo, bs = copied_toolchain(tmp_path)
    return Toolchain(cargo, bs, tmp_path / "tc")


def _start(daemon: DaemonHandle, toolchain: Toolchain, host: TestHost, mode: str) -> None:
    daemon.restart("--cargo", str(toolchain.cargo),
                   policy=ALLOW_CARGO.format(mode=mode, net=f"{host.v4}/32"))


def _connections(daemon: DaemonHandle) -> list[dict[str, Any]]:
    return [e for e in daemon.events("connection")]


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONHOME": sys.base_prefix})


def _connection_of(proto: str) -> Any:
    return lambda e: e["type"] == "connection" and e["protocol"] == proto


# -- builds known from their first instruction ---------------------------------------------

EARLY = """
import socket, sys, time
delay, proto, tag = float(sys.argv[1]), sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
time.sleep(delay)
try:
    if proto == "tcp":
        s.settimeout(3)
        s.connect(("{host}", 8080))
        s.sendall(b"GET /" + tag.encode() + b" HTTP/1.0\\r\\n\\r\\n")
        print("reply", s.recv(64)[:12])
    else:
        s.sendto(tag.encode(), ("{host}", 5353))
        print("sent")
except OSError as e:
    print(type(e).__name__)
"""


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.005, 0.150])
def test_flows_right_after_cargos_exec_are_judged(daemon: DaemonHandle, test_host: TestHost,
                                                  toolchain: Toolchain, tmp_path: Path,
                                                  delay: float) -> None:
    """A program that is a toolchain's cargo makes its socket at its first line and uses it
    0, 1, 5 or 150 ms later (150: long after the daemon moved it into its build cgroup, which
    a socket made before the move never follows). Enforce mode, a policy that allows cargo
    nothing: every attempt is judged, refused, and nothing reaches the test host."""
    daemon.restart("--cargo", str(toolchain.cargo), policy="version: 1\nmode: enforce\n")
    script = EARLY.replace("{host}", test_host.v4)
    for proto in ("tcp", "udp"):
        tag = f"early-{proto}-{int(delay * 1000)}"
        out = _run([str(toolchain.cargo), "-c", script, str(delay), proto, tag])
        assert out.returncode == 0, out.stderr
        event = daemon.wait_event(f"the {proto} attempt", _connection_of(proto))
        assert event["decision"] == "deny", event
        assert event["role"] == "cargo" and event["identity"] == "kernel", event
        assert event["process"]["exe"] == str(toolchain.cargo)
    assert test_host.requests() == [], "a flow right after cargo's exec got through"


def test_real_cargo_still_gets_its_registry(daemon: DaemonHandle, test_host: TestHost,
                                            toolchain: Toolchain, tmp_path: Path) -> None:
    """The real toolchain cargo (through rustup's proxy) is role cargo by identity: a policy
    allowing cargo its registry lets its request through."""
    _start(daemon, toolchain, test_host, "enforce")
    env = env_with_cargo()
    cargo = shutil.which("cargo", path=env["PATH"])
    assert cargo is not None
    subprocess.run([cargo, "search", "--index", f"sparse+http://{test_host.v4}:8080/idx/",
                    "anything"], capture_output=True, text=True, timeout=60, env=env,
                   cwd=tmp_path)
    got = wait_until("cargo's registry request", lambda: [
        r for r in test_host.requests() if str(r.get("path", "")).startswith("/idx/")])
    assert got
    event = daemon.wait_event("cargo's connection", lambda e: e["type"] == "connection")
    assert event["role"] == "cargo" and event["decision"] == "allow", event
    assert "toolchain cargo" in event["role_basis"]


# -- short-lived senders --------------------------------------------------------------------

SENDERS = """
import subprocess, sys
bs, host, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
# Each datagram from a source port of its own: one reusing the 5-tuple of a flow conntrack
# still holds is that flow's (never queued again), which is not what is tested here.
udp = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\\n"
       "s.bind(('', %d)); s.sendto(b'u', ('%s', 5353))")
tcp = ("import socket; s = socket.socket(); s.setblocking(False)\\n"
       "try: s.connect(('%s', 8080))\\nexcept BlockingIOError: pass" % host)
for i in range(n):
    subprocess.run([bs, "-c", udp % (42000 + i, host)], check=True)
for _ in range(n):
    subprocess.run([bs, "-c", tcp], check=True)
"""


def test_short_lived_senders_are_attributed_every_time(daemon: DaemonHandle,
                                                       test_host: TestHost,
                                                       toolchain: Toolchain) -> None:
    """A build script that sends one UDP datagram and exits, and one that starts a TCP
    connection and exits at once (its SYN queued after it is gone): 100 of each, every one
    attributed to its exe, role and crate."""
    _start(daemon, toolchain, test_host, "audit")
    n = 100
    out = _run([str(toolchain.cargo), "-c", SENDERS, str(toolchain.build_script), test_host.v4,
                str(n)], timeout=300)
    assert out.returncode == 0, out.stderr

    def all_in() -> list[dict[str, Any]] | None:
        found = [e for e in _connections(daemon) if e["role"] != "cargo"]
        return found if len(found) >= 2 * n else None
    events = wait_until("every sender's connection", all_in, timeout=60)
    wrong = [e for e in events if (e["role"], e["crate"] and e["crate"]["name"],
                                   e["process"] and e["process"]["exe"], e["identity"])
             != ("build-script", "evil", str(toolchain.build_script), "kernel")]
    assert not wrong, f"{len(wrong)} of {len(events)} misattributed, e.g. {wrong[:2]}"
    assert sum(e["protocol"] == "udp" for e in events) == n
    assert sum(1 for r in test_host.requests() if r.get("proto") == "udp") == n


# -- names borrowed from crate code -----------------------------------------------------------

TRICKS = r"""
import os, shutil, subprocess, sys
host, tmp, real_cargo, rustup = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
curl = shutil.which("curl")
url = lambda tag: f"http://{host}:8080/{tag}"
def copy(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy2(src, dst)
    return dst
runs = [
    ("named-cargo", [copy(curl, f"{tmp}/t1/cargo"), "-s", "-m", "3", url("named-cargo")], None),
    ("cargo-x", [copy(curl, f"{tmp}/t2/cargo-x"), "-s", "-m", "3", url("cargo-x")], None),
    ("argv0-cargo", ["cargo", "search", "--index", f"sparse+{url('argv0-cargo')}/", "x"],
     copy(rustup, f"{tmp}/t3/rustup")),
    ("victim", [copy(sys.executable,
                     f"{tmp}/t4/target/debug/build/victim-0123456789abcdef/build-script-build"),
                "-c", "import urllib.request as u; u.urlopen(%r, timeout=3)" % url("victim")],
     None),
    ("real-cargo", [real_cargo, "search", "--index", f"sparse+{url('real-cargo')}/", "x"], None),
]
for tag, argv, exe in runs:
    env = dict(os.environ, CARGO_PKG_NAME="victim", CARGO_PKG_VERSION="1.0.0")
    subprocess.run(argv, executable=exe, env=env, timeout=60, capture_output=True)
"""


def test_crate_code_borrows_no_role_or_crate(daemon: DaemonHandle, test_host: TestHost,
                                             toolchain: Toolchain, tmp_path: Path) -> None:
    """A build script runs: a copy of curl named cargo, one named cargo-x, a copy of rustup
    exec'd with argv[0] cargo (which runs the real cargo), a build-script-build of a crate the
    policy makes an exception for (with that crate's CARGO_PKG_NAME), and the real toolchain
    cargo. The policy allows role cargo and that crate: every attempt is still the build
    script's, and refused."""
    _start(daemon, toolchain, test_host, "enforce")
    env = env_with_cargo()
    real = subprocess.run(["rustup", "which", "cargo"], capture_output=True, text=True,
                          env=env, check=True).stdout.strip()
    rustup = os.path.realpath(shutil.which("rustup", path=env["PATH"]) or "rustup")
    runner = "import subprocess, sys; subprocess.run([sys.argv[1], '-c', sys.argv[2], " \
             "*sys.argv[3:]], check=True)"
    out = _run([str(toolchain.cargo), "-c", runner, str(toolchain.build_script), TRICKS,
                test_host.v4, str(tmp_path), real, rustup], timeout=300)
    assert out.returncode == 0, out.stderr
    tags = ("named-cargo", "cargo-x", "argv0-cargo", "victim", "real-cargo")

    def each_seen() -> list[dict[str, Any]] | None:
        found = [e for e in _connections(daemon) if e["dst"]["ip"] == test_host.v4]
        return found if len(found) >= len(tags) else None
    events = wait_until("every trick's connection", each_seen, timeout=60)
    for event in events:
        assert (event["role"], event["crate"]["name"], event["decision"]) == \
            ("build-script", "evil", "deny"), event
    assert test_host.requests() == [], "a borrowed name got through"



DNS_AND_CLOSE = """
import socket, struct, sys
host, names = sys.argv[1], sys.argv[2:]
for name in names:
    q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0"
    q += struct.pack("!HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(q, (host, 53))
    s.close()
"""


def test_a_query_sent_and_closed_is_never_forwarded_unjudged(daemon: DaemonHandle,
                                                             test_host: TestHost,
                                                             toolchain: Toolchain) -> None:
    """A build script sends each DNS query from a socket it closes at once, so the resolver
    may find nobody to attribute it to. Such a query must never reach the upstream: each
    name is either recorded against the build or absent from the upstream's log."""
    log = test_host.start_dns()
    daemon.restart("--cargo", str(toolchain.cargo), "--dns-upstream", test_host.v4,
                   policy="version: 1\nmode: audit\n")
    names = [f"q{i}.pkg.test.example" for i in range(20)]
    out = _run([str(toolchain.cargo), "-c", "import subprocess, sys; subprocess.run(["
                "sys.argv[1], '-c', sys.argv[2], *sys.argv[3:]], check=True)",
                str(toolchain.build_script), DNS_AND_CLOSE, test_host.v4, *names])
    assert out.returncode == 0, out.stderr

    def recorded() -> set[str]:
        return {e["query"]["name"] for e in daemon.events("dns")} & set(names)

    def handled() -> bool | None:
        return len(recorded()) + daemon.metric("egress_monitor_dns_unattributed_total") \
            >= len(names) or None
    wait_until("every query judged or refused", handled, timeout=30)
    upstream = log.read_text()
    leaked = [n for n in names if n in upstream and n not in recorded()]
    assert not leaked, f"forwarded without a record: {leaked}"


def test_a_build_script_that_re_execs_at_once_keeps_its_crate(daemon: DaemonHandle,
                                                              test_host: TestHost,
                                                              toolchain: Toolchain,
                                                              tmp_path: Path) -> None:
    """A build script whose first instruction execs another program (so the kernel's latest
    exec record is that program's before the daemon reads the build script's) is still the
    build script of its crate, and so is what it became: 20 times."""
    other = tmp_path / "elsewhere" / "python"
    other.parent.mkdir()
    shutil.copy2(PYTHON, other)
    _start(daemon, toolchain, test_host, "audit")
    connect = (f"import socket; socket.create_connection(('{test_host.v4}', 8080), "
               "timeout=3).close()")
    reexec = f"import os; os.execv({str(other)!r}, [{str(other)!r}, '-c', {connect!r}])"
    runner = ("import subprocess, sys\nfor _ in range(20):\n"
              "    subprocess.run([sys.argv[1], '-c', sys.argv[2]], check=True)")
    out = _run([str(toolchain.cargo), "-c", runner, str(toolchain.build_script), reexec])
    assert out.returncode == 0, out.stderr

    def all_in() -> list[dict[str, Any]] | None:
        found = [e for e in _connections(daemon) if e["dst"]["ip"] == test_host.v4]
        return found if len(found) >= 20 else None
    events = wait_until("the 20 connections", all_in, timeout=60)
    wrong = [e for e in events if (e["role"], (e["crate"] or {}).get("name")) !=
             ("build-script", "evil")]
    assert not wrong, f"{len(wrong)} of 20 lost their crate, e.g. {wrong[:1]}"
    assert all(e["process"]["exe"] == str(other) for e in events)
