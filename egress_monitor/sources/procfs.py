"""Read process facts from /proc, tolerating processes that vanish mid-read.

``proc_root`` is injectable so tests can point it at a recorded tree. Of the environment
:meth:`ProcFS.info` keeps only the Cargo variables used for attribution; :meth:`ProcFS.environ`
hands the raw bytes to the secret fingerprinting (detect/secrets.py), which keeps
fingerprints of secret values in memory and drops the rest.

The text parsers (:func:`parse_ppid`, :func:`parse_cgroup2`, :func:`parse_net_table`,
:func:`parse_socket_link`) are pure and never raise: what they cannot read gives None or
nothing. A build chooses its processes' names (``comm`` in ``stat``) and can create cgroups
with names that are not UTF-8: such a cgroup path is returned with the bytes that are not
UTF-8 as surrogate escapes (``os`` functions turn them back into the same bytes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from egress_monitor.events import ExecInfo
from egress_monitor.loopback import NetEntry, parse_table

KEPT_ENV = (b"CARGO_PKG_NAME", b"CARGO_PKG_VERSION", b"CARGO_MANIFEST_DIR")
_ENV_PREFIXES = tuple(name + b"=" for name in KEPT_ENV)
MAX_ARGV = 64
MAX_ARG_LEN = 512
_NUMBER = re.compile(rb"[0-9]{1,19}", re.ASCII)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,8}", re.ASCII)
_SOCKET_LINK = re.compile(r"socket:\[([0-9]{1,19})\]", re.ASCII)


def parse_ppid(stat: bytes) -> int | None:
    """The parent pid in a ``/proc/PID/stat`` text (fields resume after the last ')':
    ``comm`` may hold spaces and parentheses)."""
    fields = stat[stat.rfind(b")") + 1:].split()
    if len(fields) > 1 and _NUMBER.fullmatch(fields[1]):
        return int(fields[1])
    return None


def parse_cgroup2(text: bytes) -> str | None:
    """The cgroup v2 path (the ``0::`` line) of a ``/proc/PID/cgroup`` text."""
    for line in text.split(b"\n"):
        if line.startswith(b"0::"):
            return line[3:].decode("utf-8", "surrogateescape")
    return None


def parse_net_table(text: bytes, local_port: int | None = None) -> set[int]:
    """Socket inodes of a ``/proc/net/<table>`` text, with ``local_port`` only those bound
    to that port; lines that cannot be read are skipped."""
    found: set[int] = set()
    for line in text.split(b"\n")[1:]:
        cols = line.split()
        if len(cols) < 10:
            continue
        port_hex = cols[1].rpartition(b":")[2]
        if not _HEX.fullmatch(port_hex) or not _NUMBER.fullmatch(cols[9]):
            continue
        if local_port is None or int(port_hex, 16) == local_port:
            found.add(int(cols[9]))
    return found


def parse_socket_link(target: str) -> int | None:
    """The inode of a ``socket:[N]`` fd link, else None."""
    m = _SOCKET_LINK.fullmatch(target)
    return int(m.group(1)) if m else None
MAX_ENVIRON = 1 << 20
MAX_NET_TABLE = 64 << 20


class ProcFS:
    """Accessors over one /proc mount."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self.root = proc_root

    def _path(self, pid: int, name: str) -> str:
        return f"{self.root}/{pid}/{name}"

    def exe(self, pid: int) -> str | None:
        """The executable path, or None if the process is gone or a kernel thread."""
        try:
            return os.readlink(self._path(pid, "exe"))
        except OSError:
            return None

    def info(self, pid: int, full: bool = True) -> ExecInfo:
        """Exe only (``full=False``), or exe, argv, cwd, uid and the kept Cargo variables."""
        exe = self.exe(pid)
        if not full:
            return ExecInfo(exe=exe)
        argv: tuple[str, ...] = ()
        cwd = uid = None
        env: list[tuple[str, str]] = []
        try:
            with open(self._path(pid, "cmdline"), "rb") as f:
                raw = f.read(MAX_ARGV * MAX_ARG_LEN)
            argv = tuple(a[:MAX_ARG_LEN].decode("utf-8", "replace")
                         for a in raw.split(b"\0")[:MAX_ARGV] if a)
            cwd = os.readlink(self._path(pid, "cwd"))
            uid = os.stat(self._path(pid, "status")).st_uid
            with open(self._path(pid, "environ"), "rb") as f:
                for item in f.read().split(b"\0"):
                    if item.startswith(_ENV_PREFIXES):
                        key, _, value = item.partition(b"=")
                        env.append((key.decode(), value.decode("utf-8", "replace")))
        except OSError:
            pass  # gone, or a kernel thread: keep what was read
        return ExecInfo(exe=exe, argv=argv, cwd=cwd, uid=uid, cargo_env=tuple(env))

    def environ(self, pid: int) -> bytes:
        """The raw environment (at most ``MAX_ENVIRON`` bytes; b"" when gone). The caller
        fingerprints the secrets in it and drops the bytes (detect/secrets.py)."""
        try:
            with open(self._path(pid, "environ"), "rb") as f:
                return f.read(MAX_ENVIRON)
        except OSError:
            return b""

    def net_table(self, table: str) -> list[NetEntry]:
        """The sockets of ``/proc/net/<table>`` (tcp, tcp6, udp, udp6); empty if unreadable."""
        try:
            with open(f"{self.root}/net/{table}") as f:
                return parse_table(f.read(MAX_NET_TABLE))
        except OSError:
            return []

    def pids(self) -> Iterator[int]:
        """Every thread-group id in /proc now."""
        for name in os.listdir(self.root):
            if name.isascii() and name.isdigit():
                yield int(name)

    def ppid(self, pid: int) -> int | None:
        """The current parent pid (after any reparenting), or None if gone."""
        try:
            with open(self._path(pid, "stat"), "rb") as f:
                stat = f.read(4096)
        except OSError:
            return None
        return parse_ppid(stat)

    def cgroup2(self, pid: int) -> str | None:
        """The process's cgroup v2 path (the ``0::`` line), or None."""
        try:
            with open(self._path(pid, "cgroup"), "rb") as f:
                return parse_cgroup2(f.read(1 << 16))
        except OSError:
            return None

    def socket_inodes(self, pid: int) -> set[int]:
        """Inodes of the sockets among the process's open files (empty if gone)."""
        fd_dir = self._path(pid, "fd")
        found: set[int] = set()
        try:
            names = os.listdir(fd_dir)
        except OSError:
            return found
        for name in names:
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            inode = parse_socket_link(target)
            if inode is not None:
                found.add(inode)
        return found

    def net_inodes(self, table: str, local_port: int | None = None) -> set[int]:
        """Socket inodes listed in ``/proc/net/<table>`` (icmp, icmp6, raw, raw6, udp ...).

        With ``local_port``, only entries bound to that port (for ping sockets, the echo id).
        """
        try:
            with open(f"{self.root}/net/{table}", "rb") as f:
                return parse_net_table(f.read(), local_port)
        except OSError:
            return set()
