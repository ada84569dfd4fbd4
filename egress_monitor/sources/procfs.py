"""Read process facts from /proc, tolerating processes that vanish mid-read.

``proc_root`` is injectable so tests can point it at a recorded tree. Of the environment
:meth:`ProcFS.info` keeps only the Cargo variables used for attribution; :meth:`ProcFS.environ`
hands the raw bytes to the secret fingerprinting (detect/secrets.py), which keeps
fingerprints of secret values in memory and drops the rest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from egress_monitor.events import ExecInfo
from egress_monitor.loopback import NetEntry, parse_table

KEPT_ENV = (b"CARGO_PKG_NAME", b"CARGO_PKG_VERSION", b"CARGO_MANIFEST_DIR")
_ENV_PREFIXES = tuple(name + b"=" for name in KEPT_ENV)
MAX_ARGV = 64
MAX_ARG_LEN = 512
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
            if name.isdigit():
                yield int(name)

    def ppid(self, pid: int) -> int | None:
        """The current parent pid (after any reparenting), or None if gone."""
        try:
            with open(self._path(pid, "stat"), "rb") as f:
                stat = f.read()
        except OSError:
            return None
        # comm may contain spaces and parentheses: fields resume after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        return int(fields[1]) if len(fields) > 1 else None

    def cgroup2(self, pid: int) -> str | None:
        """The process's cgroup v2 path (the ``0::`` line), or None."""
        try:
            with open(self._path(pid, "cgroup"), "rb") as f:
                for line in f:
                    if line.startswith(b"0::"):
                        return line[3:].strip().decode()
        except OSError:
            return None
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
            if target.startswith("socket:["):
                found.add(int(target[8:-1]))
        return found

    def net_inodes(self, table: str, local_port: int | None = None) -> set[int]:
        """Socket inodes listed in ``/proc/net/<table>`` (icmp, icmp6, raw, raw6, udp ...).

        With ``local_port``, only entries bound to that port (for ping sockets, the echo id).
        """
        found: set[int] = set()
        try:
            with open(f"{self.root}/net/{table}") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) < 10:
                        continue
                    port = int(cols[1].rpartition(":")[2], 16)
                    if local_port is None or port == local_port:
                        found.add(int(cols[9]))
        except OSError:
            pass
        return found
