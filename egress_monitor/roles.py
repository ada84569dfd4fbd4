"""Roles and crates: what part of a Rust build a process is, and whose code it runs.

Pure functions over :class:`~egress_monitor.events.ExecInfo`; no I/O.

The rules, in order, for a process that just exec'd inside a build:

1. A descendant of a build script or a crate binary keeps that role whatever it runs
   (an ``autocfg`` probe that runs rustc from ``build.rs`` is still build-script code).
2. ``build-script-*`` (any stem) is ``build-script``.
3. ``rustc``, ``rustdoc``, ``clippy-driver``, or a wrapper (sccache, RUSTC_WRAPPER) whose
   first argument is one of them, is ``rustc``.
4. ``cargo`` and ``cargo-*`` subcommands are ``cargo``.
5. A program that cargo (or a cargo subcommand) runs with ``CARGO_PKG_NAME`` set is a
   ``crate-binary`` (tests, benches, ``cargo run``).
6. Anything else inherits its parent's role (git and ssh under cargo are ``cargo``; the
   linker under rustc is ``rustc``); with no role above it, ``other``.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass

from egress_monitor.events import ExecInfo


class Role(enum.StrEnum):
    """The closed set of roles used in events, policy and metric labels."""

    CARGO = "cargo"
    RUSTC = "rustc"
    BUILD_SCRIPT = "build-script"
    CRATE_BINARY = "crate-binary"
    OTHER = "other"


STICKY_ROLES = frozenset({Role.BUILD_SCRIPT, Role.CRATE_BINARY})
RUSTC_NAMES = frozenset({"rustc", "rustdoc", "clippy-driver"})
RUSTUP_NAMES = frozenset({"rustup", "rustup-init"})
_HASH_SUFFIX = re.compile(r"^(?P<name>.+)-[0-9a-f]{16}$")


@dataclass(frozen=True, slots=True)
class Crate:
    """A crate a process runs code of; ``version`` is None when nothing says it."""

    name: str
    version: str | None = None


def program_name(info: ExecInfo) -> str:
    """The base name of the program: the executable's, or argv[0]'s when the exe is unknown.

    rustup's proxies (``~/.cargo/bin/cargo``, ``rustc``, ...) are hard links to rustup, so
    their exe reads ``rustup``: argv[0] says which tool was asked for.
    """
    exe = os.path.basename(info.exe.removesuffix(" (deleted)")) if info.exe else ""
    if (not exe or exe in RUSTUP_NAMES) and info.argv:
        return os.path.basename(info.argv[0])
    return exe


def is_cargo(info: ExecInfo) -> bool:
    """True for cargo itself (the rustup proxy and the toolchain binary alike)."""
    return program_name(info) == "cargo"


def is_build_script(info: ExecInfo) -> bool:
    """True for any ``build-script-*`` executable, whatever its stem."""
    return program_name(info).startswith("build-script-")


def starts_build(info: ExecInfo) -> bool:
    """True when this exec, seen outside any build, starts a new build."""
    return is_cargo(info) or is_build_script(info)


def _is_rustc(info: ExecInfo) -> bool:
    if program_name(info) in RUSTC_NAMES:
        return True
    # RUSTC_WRAPPER / RUSTC_WORKSPACE_WRAPPER: cargo runs `wrapper /path/to/rustc args...`.
    return len(info.argv) > 1 and os.path.basename(info.argv[1]) in RUSTC_NAMES


def classify(info: ExecInfo, parent_role: Role | None) -> Role:
    """The role of a process after this exec, given the role its parent had."""
    if parent_role in STICKY_ROLES:
        assert parent_role is not None
        return parent_role
    if is_build_script(info):
        return Role.BUILD_SCRIPT
    if _is_rustc(info):
        return Role.RUSTC
    name = program_name(info)
    if name == "cargo" or name.startswith("cargo-"):
        return Role.CARGO
    if parent_role is Role.CARGO and info.env("CARGO_PKG_NAME"):
        return Role.CRATE_BINARY
    return parent_role or Role.OTHER


def _name_from_hashed(path_part: str) -> str | None:
    match = _HASH_SUFFIX.match(path_part)
    return match.group("name") if match else None


def arg_value(argv: tuple[str, ...], flag: str) -> str | None:
    """The value of ``flag`` (``--flag VALUE`` or ``--flag=VALUE``) in argv, first one."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"{flag}="):
            return arg.partition("=")[2]
    return None


def crate_of(info: ExecInfo, role: Role, parent_crate: Crate | None,
             parent_role: Role | None) -> Crate | None:
    """The crate whose code this process runs, where one applies.

    A descendant of a build script or crate binary keeps that crate; a build script's own
    exec names its package from ``CARGO_PKG_NAME``/``CARGO_PKG_VERSION`` or, lacking those,
    from its build directory (``target/debug/build/<name>-<hash>/build-script-build``).
    """
    if parent_role in STICKY_ROLES and role == parent_role:
        return parent_crate
    name = info.env("CARGO_PKG_NAME")
    version = info.env("CARGO_PKG_VERSION")
    if role is Role.BUILD_SCRIPT:
        if name:
            return Crate(name, version)
        if info.exe:
            guessed = _name_from_hashed(os.path.basename(os.path.dirname(info.exe)))
            if guessed:
                return Crate(guessed, None)
        return None
    if role is Role.RUSTC:
        if name:
            return Crate(name, version)
        arg = arg_value(info.argv, "--crate-name")
        return Crate(arg, None) if arg else parent_crate
    if role is Role.CRATE_BINARY:
        if name:
            return Crate(name, version)
        guessed = _name_from_hashed(program_name(info))
        return Crate(guessed, None) if guessed else None
    return None
