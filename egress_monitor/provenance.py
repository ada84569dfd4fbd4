"""Roles by provenance: a build member's role and crate from what the kernel saw at its exec.

Pure. The kernel (``bpf/programs.py``, ``em_exec``) decides membership and a coarse role by
the exec'd file's *identity*, never its name: ``cargo`` only for a registered toolchain cargo
run by a process that is not crate code, ``rustc`` for a registered compiler run by cargo,
``crate`` for anything else cargo runs, and roles only go down. :func:`classify` refines that
coarse role for events and policy, and only *downwards*:

=================  ====================  ==================================================
kernel role after  role before the exec  role, crate
=================  ====================  ==================================================
cargo              any                   ``cargo``; a configured build-script runner
                                         (Bazel's, Buck2's: by file identity) is
                                         ``cargo`` too, and keeps the crate its own
                                         environment names (the build system set it)
rustc              cargo                 ``rustc``; crate from cargo's ``CARGO_PKG_*`` or
                                         ``--crate-name`` (cargo wrote both)
rustc              rustc                 the parent's (a proc macro's child is still rustc)
crate              runner                ``build-script`` whatever the file, with the
                                         runner's crate (never the script's environment)
crate              cargo                 cargo ran it: ``build-script`` when the file is
                                         ``<dir>/build/<name>-<hash>/build-script-*``
                                         (crate ``name``; version from its environment,
                                         else from cargo's compile of it into ``<dir>``),
                                         else ``crate-binary`` (crate from
                                         ``deps/<name>-<hash>``, else ``CARGO_PKG_NAME``)
crate              crate                 the parent's role and crate, whatever it runs now
none               any                   ``other`` (adopted by ``egress-monitor exec``, no
                                         cargo yet)
no record          (parent's)            build-script / crate-binary / rustc parents keep
                                         theirs; otherwise ``other``
=================  ====================  ==================================================

Names, argv[0] and the environment a process chooses play no part in reaching a role; the
environment and argv are read only for the crate of a process the real cargo just started
(cargo chose them), and a runner's own environment only for the crate of the scripts it
runs (the build system chose it; the caller makes sure it was read before the runner exec'd
anything else). ``basis`` says what the role rests on, for events.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from egress_monitor.events import ExecInfo
from egress_monitor.roles import STICKY_ROLES, Crate, Role, arg_value, crate_of

# Kernel role codes (bpf/programs.py ROLE_*); repeated here so the core needs no BPF import.
K_NONE, K_CARGO, K_RUSTC, K_CRATE = 0, 1, 2, 3
_CODE = {Role.CARGO: K_CARGO, Role.RUSTC: K_RUSTC, Role.BUILD_SCRIPT: K_CRATE,
         Role.CRATE_BINARY: K_CRATE}
_HASHED = re.compile(r"^(?P<name>[A-Za-z0-9_][A-Za-z0-9_.+-]*)-[0-9a-f]{16}$")


@dataclass(frozen=True, slots=True)
class KernelExec:
    """What the kernel recorded for a process's latest exec.

    ``role_before`` is None when only the member value was read: the tree's own record of
    the role before the exec (which came from the kernel too) stands in for it.
    ``filename`` is the path the exec was asked for (``bprm->filename``), when recorded.
    ``runner``: the exec'd file is a configured build-script runner (by identity), at
    this registered path; the kernel treats it as a cargo file.
    """

    role: int
    role_before: int | None = None
    started: bool = False
    filename: str | None = None
    runner: str | None = None


@dataclass(frozen=True, slots=True)
class Runner:
    """A configured build-script runner process: its registered path, and the crate its
    environment named when it was exec'd (``CARGO_PKG_NAME``/``CARGO_PKG_VERSION`` as the
    build system set them), given to every program it runs."""

    path: str
    crate: Crate | None


@dataclass(frozen=True, slots=True)
class Provenance:
    """A member's role and crate and what they rest on; ``ceiling``: the highest kernel role
    the process and its descendants may ever have again (K_CARGO, K_RUSTC or K_CRATE);
    ``runner``: set when the process is a configured build-script runner (role cargo);
    ``compiled``: set when the process is the compiler cargo ran to compile a build script,
    ``(its --out-dir, its package)``, for :func:`classify`'s ``compiled`` later."""

    role: Role
    crate: Crate | None
    basis: str
    ceiling: int = K_CARGO
    runner: Runner | None = None
    compiled: tuple[str, Crate] | None = None


_CEILING = {Role.CARGO: K_CARGO, Role.RUSTC: K_RUSTC, Role.BUILD_SCRIPT: K_CRATE,
            Role.CRATE_BINARY: K_CRATE}


def capped(p: Provenance, ceiling: int, prior_role: Role | None,
           prior_crate: Crate | None) -> Provenance:
    """``p`` held under a process's ``ceiling`` (roles only go down: crate code that runs the
    real cargo, or whose records were lost, stays crate code), with the new ceiling."""
    own = max(p.ceiling, _CEILING.get(p.role, p.ceiling))
    if ceiling >= K_CRATE and p.role in (Role.CARGO, Role.RUSTC):
        keep = prior_role if prior_role in STICKY_ROLES else Role.OTHER
        return Provenance(keep, prior_crate if keep in STICKY_ROLES else None,
                          f"{p.basis}; held at crate code (roles only go down)", K_CRATE)
    if ceiling == K_RUSTC and p.role is Role.CARGO:
        return Provenance(Role.RUSTC, prior_crate if prior_role is Role.RUSTC else None,
                          f"{p.basis}; held at the compiler (roles only go down)", K_RUSTC)
    return Provenance(p.role, p.crate, p.basis, max(ceiling, own), p.runner, p.compiled)


def _hashed_name(part: str) -> str | None:
    m = _HASHED.match(part)
    return m.group("name") if m else None


def build_script_crate(path: str) -> str | None:
    """The crate of a build script cargo compiled: ``.../build/<name>-<hash>/build-script-*``."""
    directory, base = os.path.split(path)
    if not base.startswith("build-script-"):
        return None
    parent, hashed = os.path.split(directory)
    if os.path.basename(parent) != "build":
        return None
    return _hashed_name(hashed)


def compiled_build_script(info: ExecInfo) -> tuple[str, Crate] | None:
    """For the compiler cargo ran: when it compiles a build script (``--crate-name
    build_script_*``, ``--out-dir <dir>/build/<name>-<hash>``, ``CARGO_PKG_NAME`` that
    ``name``), ``(out-dir, package)``: cargo wrote all three, and the compiler lives long
    enough for /proc to be read, unlike a build script that exits or execs on at once."""
    out = arg_value(info.argv, "--out-dir")
    crate_name = arg_value(info.argv, "--crate-name") or ""
    name = info.env("CARGO_PKG_NAME")
    if not out or not name or not crate_name.startswith("build_script_"):
        return None
    out = os.path.normpath(out)
    if build_script_crate(os.path.join(out, "build-script-build")) != name:
        return None
    return out, Crate(name, info.env("CARGO_PKG_VERSION"))


def _cargo_ran(path: str | None, info: ExecInfo,
               compiled: Mapping[str, Crate] | None = None) -> Provenance:
    """Something the real cargo exec'd that is not a registered toolchain file."""
    if path:
        name = build_script_crate(path)
        if name is not None:
            # cargo's environment gives the version, when it names the same package; else
            # what cargo's compile of that build script said (its /proc already gone)
            same = info.env("CARGO_PKG_NAME") == name
            version = info.env("CARGO_PKG_VERSION") if same else None
            basis = f"cargo ran build script {path}"
            known = (compiled or {}).get(os.path.dirname(os.path.normpath(path)))
            if version is None and known is not None and known.name == name \
                    and known.version:
                version = known.version
                basis += " (version from its compile)"
            return Provenance(Role.BUILD_SCRIPT, Crate(name, version), basis)
        directory, base = os.path.split(path)
        if os.path.basename(directory) == "deps":
            name = _hashed_name(base)
            if name is not None:
                return Provenance(Role.CRATE_BINARY, Crate(name, info.env("CARGO_PKG_VERSION")),
                                  f"cargo ran test binary {path}")
    pkg = info.env("CARGO_PKG_NAME")
    crate = Crate(pkg, info.env("CARGO_PKG_VERSION")) if pkg else None
    return Provenance(Role.CRATE_BINARY, crate, f"cargo ran {path or info.exe or 'a program'}")


def _runner_ran(runner: Runner, path: str | None) -> Provenance:
    """Something a configured build-script runner exec'd: its build script, whatever the
    file is called, of the crate the runner's environment named."""
    return Provenance(Role.BUILD_SCRIPT, runner.crate,
                      f"build-script runner {runner.path} ran {path or 'a program'} (crate "
                      "from the runner's environment)")


def classify(k: KernelExec | None, info: ExecInfo, parent_role: Role | None,
             parent_crate: Crate | None, parent_runner: Runner | None = None,
             compiled: Mapping[str, Crate] | None = None) -> Provenance:
    """The role and crate of a member after an exec (table in the module docstring).

    ``parent_runner``: the process was a configured build-script runner (or its fork) right
    before this exec. ``compiled``: the build's build-script out-dirs as the compilers cargo
    ran named them (:func:`compiled_build_script`), for the version of a build script whose
    own environment could not be read. ``info`` is read for the crate only of a process
    cargo just started and of a runner itself."""
    if k is None:
        if parent_role in STICKY_ROLES or parent_role is Role.RUSTC:
            assert parent_role is not None
            return Provenance(parent_role, parent_crate, "inherited (no kernel record)")
        return Provenance(Role.OTHER, None, "no kernel record", K_CRATE)
    if k.role == K_CARGO:
        if k.runner is not None:
            pkg = info.env("CARGO_PKG_NAME")
            crate = Crate(pkg, info.env("CARGO_PKG_VERSION")) if pkg else None
            return Provenance(Role.CARGO, None,
                              f"kernel: configured build-script runner {k.runner}",
                              runner=Runner(k.runner, crate))
        return Provenance(Role.CARGO, None, f"kernel: toolchain cargo {k.filename or ''}".strip())
    before = k.role_before if k.role_before is not None else \
        _CODE.get(parent_role, K_NONE) if parent_role is not None else K_NONE
    if k.role == K_RUSTC:
        if before == K_CARGO:
            return Provenance(Role.RUSTC, crate_of(info, Role.RUSTC, None, None),
                              f"kernel: cargo ran compiler {k.filename or ''}".strip(),
                              compiled=compiled_build_script(info))
        return Provenance(Role.RUSTC, parent_crate if parent_role is Role.RUSTC else None,
                          "kernel: below the compiler")
    if k.role == K_CRATE:
        if before == K_CARGO:
            if parent_runner is not None:
                return _runner_ran(parent_runner, k.filename or info.exe)
            return _cargo_ran(k.filename or info.exe, info, compiled)
        if parent_role in STICKY_ROLES:
            assert parent_role is not None
            return Provenance(parent_role, parent_crate, "kernel: below crate code")
        return Provenance(Role.OTHER, None, "kernel: crate code of unknown origin", K_CRATE)
    return Provenance(Role.OTHER, None, "kernel: no role (adopted)")


# Kinds of registered toolchain files (bpf/programs.py FILE_*); FILE_OTHER: not registered.
# FILE_RUNNER (a configured build-script runner) is userspace's: the kernel has it as cargo.
FILE_OTHER, FILE_CARGO, FILE_RUSTC, FILE_TOOL, FILE_RUNNER = 0, 1, 2, 3, 4


def mirror(kind: int, before: Role | None, in_build: bool,
           path: str | None = None) -> KernelExec | None:
    """What ``em_exec`` would have decided for an exec of a file of ``kind`` by a process
    with role ``before``: for processes that predate the daemon (seed, adoption after a
    restart, a resync), whose execs the kernel never saw. ``kind`` comes from the file's
    identity (``stat`` of /proc/PID/exe against the registered toolchain files); ``path``
    is the registered path of that file, named as ``runner`` when it is a build-script
    runner that the decision makes cargo."""
    if kind == FILE_RUNNER:
        k = mirror(FILE_CARGO, before, in_build)
        return dataclasses.replace(k, runner=path or "?") if k and k.role == K_CARGO else k
    if not in_build:
        return KernelExec(K_CARGO, K_NONE, started=True) if kind == FILE_CARGO else None
    code = _CODE.get(before, K_NONE) if before is not None else K_NONE
    if code == K_CARGO:
        role = {FILE_CARGO: K_CARGO, FILE_TOOL: K_CARGO, FILE_RUSTC: K_RUSTC}.get(kind, K_CRATE)
        return KernelExec(role, K_CARGO)
    if code == K_NONE:
        return KernelExec(K_CARGO if kind == FILE_CARGO else K_NONE, K_NONE)
    return KernelExec(code, code)
