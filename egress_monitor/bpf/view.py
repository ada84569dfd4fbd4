"""The process tree's window onto the kernel's membership (:class:`process_tree.Kernel`).

:class:`KernelView` answers, for the tree, what ``em_exec`` decided for a process's exec (its
role by provenance, whether it started a build) from the BPF maps, and mirrors that decision
for processes the kernel never saw exec (they predate the daemon) from the exec'd file's
identity. :func:`register_toolchains` tells the kernel which files are a toolchain's cargo,
compilers and tools, by identity. Both read the kernel (map syscalls, ``stat``): they belong
with BPF loading, not in the core.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from egress_monitor.bpf import programs
from egress_monitor.bpf.owner import BpfOwner
from egress_monitor.bpf.toolchains import cargo_files, rustup_homes
from egress_monitor.events import ExecInfo
from egress_monitor.provenance import KernelExec, mirror
from egress_monitor.roles import Role

log = logging.getLogger(__name__)
COMPILERS = ("rustc", "rustdoc", "clippy-driver")
DISTRIBUTION_COMPILERS = tuple(f"/usr/bin/{n}" for n in COMPILERS)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return programs.kernel_dev(st.st_dev), st.st_ino


class KernelView:
    """Exec records and file kinds for the tree, from one :class:`BpfOwner`."""

    def __init__(self, owner: BpfOwner) -> None:
        self.owner = owner
        self.kinds: dict[tuple[int, int], int] = {}  # (kernel dev, inode) -> FILE_*

    def register(self, path: str, kind: int) -> bool:
        """Register one file by identity; False when it does not exist."""
        ident = _identity(path)
        if ident is None or ident in self.kinds:
            return ident is not None
        self.owner.add_toolchain_file(path, kind)
        self.kinds[ident] = kind
        return True

    def exec_of(self, pid: int, since_ns: int) -> KernelExec | None:
        record = getattr(self.owner, "exec_record", None)
        if record is not None:
            rec = record(pid)
            if rec is not None and rec.ktime_ns >= since_ns:
                return KernelExec(rec.role_after, rec.role_before, rec.started,
                                  rec.filename or None)
            if rec is not None:
                return None
        # No exec record: the member value (alive processes only, so never a stale pid's).
        value = self.owner.member(pid)
        if value is None:
            return None
        started = bool(value & programs.PENDING) and value & 0xFFFFFFFF == pid
        return KernelExec(programs.member_role(value), None, started)

    def kind_of(self, info: ExecInfo) -> int:
        """The registered kind of the file a process runs (0: not a toolchain file)."""
        exe = info.exe.removesuffix(" (deleted)") if info.exe else None
        ident = _identity(exe) if exe else None
        return self.kinds.get(ident, 0) if ident is not None else 0

    def mirror(self, info: ExecInfo, before: Role | None, in_build: bool) -> KernelExec | None:
        return mirror(self.kind_of(info), before, in_build)


def _homes(extra: Iterable[str]) -> list[Path]:
    # Each runner user's rustup too: builds run as users other than the daemon's.
    users = [*sorted(glob.glob("/home/*/.rustup")), "/root/.rustup"]
    seen: list[Path] = []
    for home in rustup_homes(dict(os.environ), [*extra, *users]):
        if home not in seen:
            seen.append(home)
    return seen


def register_toolchains(view: KernelView, *, rustup: Iterable[str] = (),
                        cargo: Iterable[str] = (), rustc: Iterable[str] = ()) -> list[str]:
    """Register every toolchain's cargo (FILE_CARGO), compilers (FILE_RUSTC) and the tools
    that keep their caller's role (rustup's proxy binary, git: FILE_TOOL); returns one line
    per registered file, for the log."""
    homes = _homes(rustup)
    done: list[str] = []

    def add(path: str, kind: int, label: str) -> None:
        if view.register(path, kind):
            done.append(f"{label} {path}")

    for path in cargo_files(homes, list(cargo)):
        add(path, programs.FILE_CARGO, "cargo")
        bindir = os.path.dirname(path)
        for name in COMPILERS:
            add(os.path.join(bindir, name), programs.FILE_RUSTC, "compiler")
    for path in [*DISTRIBUTION_COMPILERS, *rustc]:
        add(os.path.realpath(path), programs.FILE_RUSTC, "compiler")
    tools = [str(h.parent / ".cargo" / "bin" / "rustup") for h in homes]
    tools += [p for p in (shutil.which("rustup"), shutil.which("git")) if p]
    for path in tools:
        add(os.path.realpath(path), programs.FILE_TOOL, "tool")
    return done
