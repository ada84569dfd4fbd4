"""Fixtures for kernel tests: root, a test host, the real daemon, real cargo workspaces.

These tests never skip. If the machine cannot run them (not root, no cgroup2, no iptables,
no cargo) they fail with the reason, so a CI run can never pass green without them.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from egress_monitor.enforce.cgroups import Cgroups
from egress_monitor.enforce.firewall import Firewall
from tests.kernel.netlab import DaemonHandle, TestHost, Workspace, env_with_cargo, leftover_state

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
    for tool in ("iptables", "ip6tables", "iptables-restore", "ip", "curl", "dnsmasq", "unshare"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed (make test installs it)")
    if shutil.which("cargo", path=env_with_cargo()["PATH"]) is None:
        problems.append("cargo is not installed")
    if not any("cgroup2" in line for line in Path("/proc/self/mountinfo").read_text()
               .splitlines()):
        problems.append("no cgroup2 hierarchy is mounted")
    if problems:
        pytest.fail("cannot run kernel tests: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def host_sysctls() -> Iterator[None]:
    """Put back the conntrack accounting switch the daemons turn on (a test kills one)."""
    path = Path("/proc/sys/net/netfilter/nf_conntrack_acct")
    before = path.read_text() if path.exists() else None
    yield
    if before is not None:
        path.write_text(before)
        Path("/run/egress-monitor/conntrack_acct.before").unlink(missing_ok=True)


@pytest.fixture
def test_host(tmp_path: Path) -> Iterator[TestHost]:
    """A host in its own network namespace, recording what it receives."""
    index = next(_counter) % 60
    with TestHost(f"{os.getpid() % 10000}-{index}", index, tmp_path) as host:
        yield host


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


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A fresh workspace (and target directory) per test, so the build script runs."""
    return Workspace(tmp_path / "ws")
