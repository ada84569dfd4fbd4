"""The toolchain's files the kernel tells apart by identity, and their registration.

``em_exec`` decides membership and roles by the exec'd file's ``(dev, inode)`` in the
``toolchain`` map (``programs.exec_program``); this module finds the files and registers them:

- ``FILE_CARGO`` (:func:`cargo_files`): real cargo binaries, whose exec by a non-member starts
  a build: every rustup home's ``toolchains/*/bin/cargo``, the distribution's, configured
  paths. Never rustup's proxy (``~/.cargo/bin/cargo`` is a link to ``rustup``, which stands
  behind ``rustc`` too; the proxy execs the toolchain's cargo, and that exec is the one the
  kernel sees).
- ``FILE_RUSTC`` (:func:`rustc_files`): each toolchain's ``rustc``, ``rustdoc`` and
  ``clippy-driver``, the distribution's (versioned names such as ``rustc-1.80`` too),
  configured ones (a ``RUSTC_WRAPPER``, a ``RUSTC``): cargo running them becomes role rustc.
- ``FILE_TOOL`` (:func:`tool_files`): rustup's binary behind the proxies, ``git`` and its
  http(s) remote helpers: whoever runs them keeps its role.
- ``FILE_RUNNER`` (:func:`runner_files`): configured build-script runners (Bazel's
  ``cargo_build_script_runner``, a dedicated interpreter for Buck2's ``buildscript_run.py``):
  the kernel has them as cargo (their exec by a non-member starts a build, what they run is
  crate code); userspace makes what they run a build script of the crate their environment
  names (``provenance``).

Each finder returns resolved paths of regular files, each once, and never raises for a missing
directory or file. :func:`register` writes them all, each file identity once.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from egress_monitor.bpf.programs import FILE_CARGO, FILE_RUNNER, FILE_RUSTC, FILE_TOOL

DISTRIBUTION = ("/usr/bin/cargo", "/usr/local/bin/cargo")
DISTRIBUTION_BIN = ("/usr/bin", "/usr/local/bin")
GIT_CORE = ("/usr/lib/git-core", "/usr/libexec/git-core")
RUSTC_NAMES = ("rustc", "rustdoc", "clippy-driver")
_VERSIONED_RUSTC = re.compile(r"(rustc|rustdoc|clippy-driver)-[0-9][0-9.]*")
_RUSTUP_NAMES = ("rustup", "rustup-init")


class Registrar(Protocol):
    """What :func:`register` writes to (``BpfOwner``)."""

    def add_toolchain_file(self, path: str, kind: int) -> None: ...


def rustup_homes(env: dict[str, str], extra_homes: Iterable[str] = ()) -> list[Path]:
    """$RUSTUP_HOME, ``~/.rustup`` of $HOME, and any others given (e.g. each runner user's)."""
    homes = [Path(env["RUSTUP_HOME"])] if env.get("RUSTUP_HOME") else []
    if env.get("HOME"):
        homes.append(Path(env["HOME"]) / ".rustup")
    return homes + [Path(h) for h in extra_homes]


def cargo_homes(env: dict[str, str], rustup: Iterable[Path] = ()) -> list[Path]:
    """$CARGO_HOME, ``~/.cargo`` of $HOME, and the ``.cargo`` beside each ``.rustup`` given
    (where rustup puts its proxies for that user)."""
    homes = [Path(env["CARGO_HOME"])] if env.get("CARGO_HOME") else []
    if env.get("HOME"):
        homes.append(Path(env["HOME"]) / ".cargo")
    return homes + [h.with_name(".cargo") for h in rustup if h.name == ".rustup"]


def _toolchain_bins(homes: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for home in homes:
        toolchains = home / "toolchains"
        try:
            names = sorted(os.listdir(toolchains))
        except OSError:
            continue
        out += [toolchains / name / "bin" for name in names]
    return out


def _resolved(candidates: Iterable[Path], rustup_ok: bool = False) -> list[str]:
    """Resolved regular files, each once; rustup's binary only when ``rustup_ok``."""
    out: list[str] = []
    for path in candidates:
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if (real.is_file() and (rustup_ok or real.name not in _RUSTUP_NAMES)
                and str(real) not in out):
            out.append(str(real))
    return out


def cargo_files(homes: Iterable[Path], configured: Iterable[str] = (),
                distribution: Iterable[str] = DISTRIBUTION) -> list[str]:
    """Resolved paths of every toolchain cargo binary found (rustup's proxy excluded)."""
    candidates = [b / "cargo" for b in _toolchain_bins(homes)]
    return _resolved([*candidates, *(Path(p) for p in (*distribution, *configured))])


def rustc_files(homes: Iterable[Path], configured: Iterable[str] = (),
                distribution: Iterable[str] = DISTRIBUTION_BIN) -> list[str]:
    """Each toolchain's ``rustc``, ``rustdoc``, ``clippy-driver``; those in the distribution's
    bin directories (also versioned: ``rustc-1.80``); configured paths (wrappers). rustup's
    proxies, which resolve to rustup, are not among them."""
    candidates = [b / name for b in _toolchain_bins(homes) for name in RUSTC_NAMES]
    for directory in distribution:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        candidates += [Path(directory) / n for n in names
                       if n in RUSTC_NAMES or _VERSIONED_RUSTC.fullmatch(n)]
    return _resolved([*candidates, *(Path(p) for p in configured)])


def tool_files(homes: Iterable[Path], path: str = "", git_core: Iterable[str] = GIT_CORE,
               distribution: Iterable[str] = DISTRIBUTION_BIN) -> list[str]:
    """rustup's real binary (each cargo home's ``bin/rustup``, and what its ``bin/cargo``
    proxy resolves to when that is rustup: a real cargo there is never a tool), the
    distribution's ``rustup``, ``git`` (on ``path`` and in the distribution) and git's
    ``git-remote-http(s)`` helpers (cargo's ``net.git-fetch-with-cli``)."""
    homes = list(homes)
    proxies = [p for p in _resolved([h / "bin" / "cargo" for h in homes], rustup_ok=True)
               if Path(p).name in _RUSTUP_NAMES]
    candidates = [h / "bin" / "rustup" for h in homes]
    candidates += [Path(d) / "rustup" for d in distribution]
    git = shutil.which("git", path=path) if path else None
    candidates += [Path(git)] if git else []
    candidates += [Path(d) / "git" for d in distribution]
    candidates += [Path(d) / n for d in git_core for n in ("git-remote-http", "git-remote-https")]
    return [*proxies, *(p for p in _resolved(candidates, rustup_ok=True) if p not in proxies)]


def runner_files(configured: Iterable[str]) -> list[str]:
    """The configured build-script runners, resolved (a link counts as the file it names,
    which is what the kernel sees exec'd), each once; missing ones left out
    (:func:`missing` names them)."""
    return _resolved(Path(p) for p in configured)


def missing(configured: Iterable[str]) -> list[str]:
    """The configured paths that name no regular file (for a warning at start)."""
    return [p for p in configured if not _resolved([Path(p)], rustup_ok=True)]


def register(owner: Registrar, env: dict[str, str], extra_homes: Iterable[str] = (),
             cargo: Iterable[str] = (), rustc: Iterable[str] = (),
             runners: Iterable[str] = ()) -> list[tuple[str, int]]:
    """Register every toolchain file found for ``env`` (its rustup and cargo homes, $PATH for
    git), ``extra_homes`` (more rustup homes) and the configured ``cargo``, ``rustc`` and
    build-script ``runners`` paths; returns ``(path, FILE_*)`` for each registered (for the
    log).

    Each file identity is registered once, the first kind found winning, tools first: a
    rustup proxy hard-linked under a cargo or rustc name stays a tool; a runner that is also
    a toolchain file stays that file (runners come last). A file gone between finding and
    registering is skipped; a full ``toolchain`` map raises (``BpfError``).
    """
    homes = rustup_homes(env, extra_homes)
    plan = [(p, FILE_TOOL) for p in tool_files(cargo_homes(env, homes), env.get("PATH", ""))]
    plan += [(p, FILE_CARGO) for p in cargo_files(homes, cargo)]
    plan += [(p, FILE_RUSTC) for p in rustc_files(homes, rustc)]
    plan += [(p, FILE_RUNNER) for p in runner_files(runners)]
    seen: set[tuple[int, int]] = set()
    done: list[tuple[str, int]] = []
    for path, kind in plan:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        owner.add_toolchain_file(path, kind)
        done.append((path, kind))
    return done
