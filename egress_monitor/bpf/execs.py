"""Exec records: what ``em_exec`` decided at a member's exec, decoded from ``execs``.

The kernel writes one record per tgid at each exec by a build member (and at the exec of a
toolchain cargo that starts a build); it outlives the process, so userspace learns the
kernel's decision for a build script that exec'd, sent a datagram and exited before its proc
connector event was read (``/proc/PID`` and the ``members`` entry already gone). The layout
is ``programs.EXEC_RECORD``.

:func:`parse_exec_record` is pure and total: any bytes give an :class:`ExecRecord` or None.
"""

from __future__ import annotations

from dataclasses import dataclass

from egress_monitor.bpf.programs import EXEC_RECORD, EXEC_STARTED, PENDING, member_role


@dataclass(frozen=True)
class ExecRecord:
    """One exec as the kernel saw it.

    ``ktime_ns``: ``bpf_ktime_get_ns()`` at the exec (CLOCK_MONOTONIC, the proc connector's
    ``timestamp_ns`` clock). ``value``: the ``members`` value after the exec, split into
    ``role_after``, ``pending`` and ``build`` (the build id, or while pending the tgid that
    exec'd cargo). ``role_before``: the member's role before the exec (``ROLE_NONE`` for the
    exec that started the build, ``started``). ``dev``/``inode``: identity of ``bprm->file``,
    the file the kernel runs (for a ``#!`` script, its interpreter), dev in the kernel's
    encoding (``programs.kernel_dev``). ``filename``: ``bprm->filename``, the path given to
    execve (for a script the script itself; relative as given; ``/dev/fd/N`` forms for
    fexecve), at most 255 bytes, decoded with surrogateescape (undecodable bytes kept).
    """

    tgid: int
    ktime_ns: int
    value: int
    role_before: int
    role_after: int
    started: bool
    pending: bool
    build: int
    dev: int
    inode: int
    filename: str


def parse_exec_record(tgid: int, raw: bytes) -> ExecRecord | None:
    """Decode one ``execs`` value; None unless ``raw`` is exactly one record."""
    if len(raw) != EXEC_RECORD.size:
        return None
    ktime, value, role_before, flags, dev, inode, name = EXEC_RECORD.unpack(raw)
    end = name.find(b"\0")
    return ExecRecord(tgid=tgid, ktime_ns=ktime, value=value, role_before=role_before,
                      role_after=member_role(value), started=bool(flags & EXEC_STARTED),
                      pending=bool(value & PENDING), build=value & 0xFFFFFFFF, dev=dev,
                      inode=inode,
                      filename=name[:end if end >= 0 else len(name)].decode(
                          "utf-8", "surrogateescape"))
