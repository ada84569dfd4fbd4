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
import os
from collections.abc import Iterable

from egress_monitor.bpf import programs, toolchains
from egress_monitor.bpf.owner import BpfOwner
from egress_monitor.events import ExecInfo
from egress_monitor.provenance import KernelExec, mirror
from egress_monitor.roles import Role


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
        self.runners: dict[tuple[int, int], str] = {}  # build-script runners: -> path

    def add_toolchain_file(self, path: str, kind: int) -> None:
        """Register one file by identity in the kernel, and remember its kind for
        :meth:`mirror` and, for a build-script runner, its path for :meth:`exec_of` (the
        ``Registrar`` that ``toolchains.register`` writes to)."""
        self.owner.add_toolchain_file(path, kind)
        ident = _identity(path)
        if ident is not None:
            self.kinds.setdefault(ident, kind)
            if self.kinds[ident] == programs.FILE_RUNNER:
                self.runners.setdefault(ident, path)

    def exec_of(self, pid: int, since_ns: int, transition: bool = False) -> KernelExec | None:
        rec = self.owner.exec_record(pid)
        if transition:
            # The exec being read is the one cargo made (or that started a build): its
            # transition record survives a re-exec that overwrote the plain one.
            first = self.owner.transition_record(pid)
            if first is not None and first.ktime_ns >= since_ns and (
                    rec is None or rec.ktime_ns >= first.ktime_ns):
                rec = first
        if rec is not None:
            if rec.ktime_ns < since_ns:
                return None  # an earlier process's with the same pid
            # A runner by the identity of the very file the kernel exec'd (its record).
            return KernelExec(rec.role_after, rec.role_before, rec.started,
                              rec.filename or None, self.runners.get((rec.dev, rec.inode)))
        # No record (the LRU refused it): the member value, alive processes only.
        value = self.owner.member(pid)
        if value is None:
            return None
        started = bool(value & programs.PENDING) and value & 0xFFFFFFFF == pid
        role = programs.member_role(value)
        exe = _identity(f"/proc/{pid}/exe") if role == programs.ROLE_CARGO else None
        return KernelExec(role, None, started,
                          runner=self.runners.get(exe) if exe is not None else None)

    def mirror(self, pid: int, info: ExecInfo, before: Role | None,
               in_build: bool) -> KernelExec | None:
        # The registered kind of the file the process runs, by the identity of the file
        # itself (/proc/PID/exe, not its name, which may since name another file).
        ident = _identity(f"/proc/{pid}/exe")
        kind = self.kinds.get(ident, 0) if ident is not None else 0
        path = self.runners.get(ident) if ident is not None else None
        return mirror(kind, before, in_build, path)


def register_toolchains(view: KernelView, *, rustup: Iterable[str] = (),
                        cargo: Iterable[str] = (), rustc: Iterable[str] = (),
                        runners: Iterable[str] = ()) -> list[str]:
    """Register every toolchain's cargo (FILE_CARGO), compilers (FILE_RUSTC), the tools
    that keep their caller's role (rustup's binary, git: FILE_TOOL) and the configured
    build-script runners (FILE_RUNNER) by identity (:func:`toolchains.register`), for the
    daemon's environment and every runner user's rustup home; returns one line per
    registered file, for the log."""
    # Each runner user's rustup too: builds run as users other than the daemon's.
    users = [*sorted(glob.glob("/home/*/.rustup")), "/root/.rustup"]
    done = toolchains.register(view, dict(os.environ), [*rustup, *users], cargo, rustc,
                               runners)
    return [f"{_LABEL.get(kind, kind)} {path}" for path, kind in done]


_LABEL = {programs.FILE_CARGO: "cargo", programs.FILE_RUSTC: "compiler",
          programs.FILE_TOOL: "tool", programs.FILE_RUNNER: "build-script runner"}
