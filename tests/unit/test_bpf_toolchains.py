"""Toolchain files on a fake tree: real cargo and rustc binaries in rustup homes, the
distribution and configured paths, never rustup's proxy; rustup and git as tools; what
``register`` writes."""

from __future__ import annotations

import os
from pathlib import Path

from egress_monitor.bpf.programs import FILE_CARGO, FILE_RUNNER, FILE_RUSTC, FILE_TOOL
from egress_monitor.bpf.toolchains import (
    cargo_files,
    missing,
    register,
    rustc_files,
    rustup_homes,
    tool_files,
)


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


def test_rustc_files_of_toolchains_distribution_and_configured_wrappers(tmp_path: Path) -> None:
    home = tmp_path / "rustup"
    bin_ = home / "toolchains" / "stable" / "bin"
    rustc, rustdoc, clippy = (_exe(bin_ / n) for n in ("rustc", "rustdoc", "clippy-driver"))
    _exe(bin_ / "cargo")  # not a rustc
    usr = tmp_path / "usr-bin"
    versioned, plain = _exe(usr / "rustc-1.80"), _exe(usr / "rustdoc")
    _exe(usr / "rustc-demangle-tool")  # not a version
    rustup = _exe(tmp_path / "cargo-home" / "bin" / "rustup")
    os.symlink(rustup, usr / "rustc")  # a proxy in the distribution's bin: not rustc
    wrapper = _exe(tmp_path / "sccache")
    found = rustc_files([home], configured=[str(wrapper), str(tmp_path / "absent")],
                        distribution=[str(usr), str(tmp_path / "no-dir")])
    assert found == [str(rustc), str(rustdoc), str(clippy), str(versioned), str(plain),
                     str(wrapper)]


def test_tool_files_are_rustup_behind_its_proxies_and_git(tmp_path: Path) -> None:
    real_rustup = _exe(tmp_path / "opt" / "rustup")
    linked = tmp_path / "linked-home"  # proxies point at a rustup elsewhere
    (linked / "bin").mkdir(parents=True)
    os.symlink(real_rustup, linked / "bin" / "cargo")
    plain = tmp_path / "plain-home"  # rustup in the home's bin
    rustup = _exe(plain / "bin" / "rustup")
    os.symlink(rustup, plain / "bin" / "cargo")
    standalone = tmp_path / "standalone-home"  # a real cargo there is no tool
    _exe(standalone / "bin" / "cargo")
    path_bin = tmp_path / "path-bin"
    git = _exe(path_bin / "git")
    git.chmod(0o755)
    core = tmp_path / "git-core"
    helper = _exe(core / "git-remote-http")
    os.link(helper, core / "git-remote-https")
    found = tool_files([linked, plain, standalone, tmp_path / "missing"], path=str(path_bin),
                       git_core=[str(core)], distribution=[])
    assert found == [str(real_rustup), str(rustup), str(git), str(helper),
                     str(core / "git-remote-https")]


class Recorder:
    """Records registrations (the kernel side is tests/kernel/test_bpf_exec.py)."""

    def __init__(self) -> None:
        self.added: list[tuple[str, int]] = []

    def add_toolchain_file(self, path: str, kind: int) -> None:
        self.added.append((path, kind))


def test_register_writes_each_identity_once_tools_first(tmp_path: Path) -> None:
    home = tmp_path / "user"
    bin_ = home / ".rustup" / "toolchains" / "stable" / "bin"
    cargo, rustc = _exe(bin_ / "cargo"), _exe(bin_ / "rustc")
    rustup = _exe(home / ".cargo" / "bin" / "rustup")
    os.link(rustup, home / ".cargo" / "bin" / "rustc")  # a hard-linked proxy
    extra = tmp_path / "runner" / ".rustup"  # another user's home: its .cargo found too
    other_cargo = _exe(extra / "toolchains" / "beta" / "bin" / "cargo")
    other_rustup = _exe(tmp_path / "runner" / ".cargo" / "bin" / "rustup")
    wrapper = _exe(tmp_path / "wrapper")
    owner = Recorder()
    done = register(owner, {"HOME": str(home), "PATH": str(tmp_path / "nothing")},
                    extra_homes=[str(extra)],
                    rustc=[str(wrapper), str(home / ".cargo" / "bin" / "rustc")])
    assert done == owner.added
    mine = [(p, k) for p, k in done if p.startswith(str(tmp_path))]
    assert mine == [(str(rustup), FILE_TOOL), (str(other_rustup), FILE_TOOL),
                    (str(cargo), FILE_CARGO), (str(other_cargo), FILE_CARGO),
                    (str(rustc), FILE_RUSTC), (str(wrapper), FILE_RUSTC)]
    assert len({os.stat(p).st_ino for p, _ in done}) == len(done)


def test_runners_are_registered_last_and_missing_ones_named(tmp_path: Path) -> None:
    """A configured build-script runner is registered as FILE_RUNNER, by the file a link
    names; one that is already a toolchain file stays that; a missing one is named."""
    home = tmp_path / "user"
    cargo = _exe(home / ".rustup" / "toolchains" / "stable" / "bin" / "cargo")
    runner = _exe(tmp_path / "bazel" / "runner")
    link = tmp_path / "link"
    os.symlink(runner, link)
    absent = str(tmp_path / "absent" / "runner")
    owner = Recorder()
    done = register(owner, {"HOME": str(home), "PATH": str(tmp_path / "nothing")},
                    runners=[str(link), str(runner), str(cargo), absent])
    mine = [(p, k) for p, k in done if p.startswith(str(tmp_path))]
    assert mine == [(str(cargo), FILE_CARGO), (str(runner), FILE_RUNNER)]
    assert missing([str(link), absent, str(tmp_path)]) == [absent, str(tmp_path)]
