"""Toolchain cargo files: real binaries in rustup homes and configured paths, never the proxy."""

from __future__ import annotations

import os
from pathlib import Path

from egress_monitor.bpf.toolchains import cargo_files, rustup_homes


def _exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF")
    return path


def test_finds_toolchain_cargos_and_configured_paths_but_not_the_proxy(tmp_path: Path) -> None:
    home = tmp_path / "rustup"
    stable = _exe(home / "toolchains" / "stable-x86_64" / "bin" / "cargo")
    nightly = _exe(home / "toolchains" / "nightly-x86_64" / "bin" / "cargo")
    (home / "toolchains" / "broken" / "bin").mkdir(parents=True)  # no cargo in it
    rustup = _exe(tmp_path / "cargo-home" / "bin" / "rustup")
    proxy = tmp_path / "cargo-home" / "bin" / "cargo"
    os.symlink(rustup, proxy)
    distro = _exe(tmp_path / "usr" / "bin" / "cargo")
    link = tmp_path / "link-to-stable"
    os.symlink(stable, link)
    found = cargo_files([home, tmp_path / "missing"], configured=[str(proxy), str(link)],
                        distribution=[str(distro), str(tmp_path / "absent")])
    assert found == [str(nightly), str(stable), str(distro)]


def test_rustup_homes_from_the_environment() -> None:
    assert rustup_homes({"RUSTUP_HOME": "/r", "HOME": "/h"}, ["/x"]) == [
        Path("/r"), Path("/h/.rustup"), Path("/x")]
    assert rustup_homes({}) == []
