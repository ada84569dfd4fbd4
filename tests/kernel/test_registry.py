"""A real registry fetch under an enforcing policy: cargo fetches, the build script cannot.

The test host serves a sparse index and the crate file over HTTP as
``registry.test.example`` (named through the DNS guard); the workspace depends on
``evil-dep`` from that registry, and evil-dep's build script POSTs to the host by address.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.netlab import BUILD_RS, DaemonHandle, TestHost, env_with_cargo

POLICY = """\
version: 1
mode: enforce
groups:
  test-registry:
    hosts: [registry.test.example]
    ports: [8080]
    protocols: [tcp]
rules:
  - id: cargo-test-registry
    role: cargo
    to: [test-registry]
    action: allow
"""


def package_crate(tmp: Path) -> Path:
    """``cargo package`` of evil-dep 0.3.10 with the test build script."""
    src = tmp / "evil-src"
    (src / "src").mkdir(parents=True)
    (src / "Cargo.toml").write_text('[package]\nname = "evil-dep"\nversion = "0.3.10"\n'
                                    'edition = "2021"\nbuild = "build.rs"\n'
                                    'description = "test"\nlicense = "MIT"\n')
    (src / "src" / "lib.rs").write_text("pub fn hello() {}\n")
    (src / "build.rs").write_text(BUILD_RS)
    env = env_with_cargo()
    env["CARGO_HOME"] = str(tmp / "cargo-home")
    subprocess.run(["cargo", "package", "--no-verify", "--offline", "-q"], cwd=src, env=env,
                   check=True, timeout=120)
    return src / "target" / "package" / "evil-dep-0.3.10.crate"


@pytest.fixture
def registry_host(tmp_path: Path) -> Iterator[TestHost]:
    """A test host serving a sparse registry that holds evil-dep 0.3.10."""
    crate = package_crate(tmp_path)
    root = tmp_path / "registry"
    (root / "index" / "ev" / "il").mkdir(parents=True)
    (root / "dl" / "evil-dep" / "0.3.10").mkdir(parents=True)
    shutil.copy(crate, root / "dl" / "evil-dep" / "0.3.10" / "download")
    (root / "index" / "config.json").write_text(json.dumps(
        {"dl": "http://registry.test.example:8080/reg/dl/{crate}/{version}/download"}))
    (root / "index" / "ev" / "il" / "evil-dep").write_text(json.dumps({
        "name": "evil-dep", "vers": "0.3.10", "deps": [], "features": {}, "yanked": False,
        "cksum": hashlib.sha256(crate.read_bytes()).hexdigest()}) + "\n")
    host = TestHost(f"{os.getpid() % 10000}-r", 58, tmp_path, static=root)
    try:
        host.start_dns(f"--host-record=registry.test.example,{host.v4}")
        yield host
    finally:
        host.close()


def test_cargo_fetches_from_the_registry_and_the_build_script_is_refused(
        daemon: DaemonHandle, registry_host: TestHost, tmp_path: Path) -> None:
    daemon.restart("--dns-upstream", registry_host.v4, policy=POLICY)

    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / ".cargo").mkdir()
    (ws / "Cargo.toml").write_text('[package]\nname = "app"\nversion = "1.0.0"\n'
                                   'edition = "2021"\n\n[dependencies]\n'
                                   'evil-dep = { version = "0.3.10", registry = "testreg" }\n')
    (ws / "src" / "main.rs").write_text("fn main() { evil_dep::hello(); }\n")
    (ws / ".cargo" / "config.toml").write_text(
        '[registries.testreg]\nindex = "sparse+http://registry.test.example:8080/reg/index/"\n')
    (ws / "resolv.conf").write_text(f"nameserver {registry_host.v4}\n")
    env = env_with_cargo()
    env.update(CARGO_HOME=str(tmp_path / "cargo-home"), CARGO_TARGET_DIR=str(ws / "target"),
               EM_ACTIONS="post4", EM_V4=registry_host.v4, EM_V6=registry_host.v6)
    cargo = shutil.which("cargo", path=env["PATH"])
    assert cargo is not None
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount --bind {ws}/resolv.conf /etc/resolv.conf && exec "$@"', "sh", cargo, "build"],
        cwd=ws, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr  # the build itself finishes

    got = [(r["method"], r["path"]) for r in registry_host.requests()]
    assert ("GET", "/reg/index/config.json") in got
    assert ("GET", "/reg/index/ev/il/evil-dep") in got
    assert ("GET", "/reg/dl/evil-dep/0.3.10/download") in got
    assert not [g for g in got if g[0] != "GET"]  # the build script's POST never arrived

    conns = daemon.events("connection")
    fetches = [e for e in conns if e["role"] == "cargo"]
    assert fetches and all(e["decision"] == "allow" and e["rule"] == "cargo-test-registry"
                           and "registry.test.example" in e["dst"]["names"] for e in fetches)
    [post] = [e for e in conns if e["role"] == "build-script"]
    assert post["decision"] == "deny" and post["rule"] == "default:build-script"
    assert post["crate"] == {"name": "evil-dep", "version": "0.3.10"}
    lookups = [e for e in daemon.events("dns") if e["query"]["name"] == "registry.test.example"]
    assert lookups and all(e["role"] == "cargo" and e["decision"] == "allow" for e in lookups)
