"""The record of network namespaces a stopped daemon left refusing (for ``cleanup``).

A clean stop while builds still run leaves each gated namespace's rules refusing those
builds' new flows (``NetnsGate.close(refusing)``). ``egress-monitor cleanup`` removes them, but
a namespace has no name it could be found by: the daemon therefore writes one line per such
namespace, ``INODE COOKIE PID`` (the process it last saw there), to ``RECORD``. Cleanup finds the
namespace (that pid's ``/proc/PID/ns/net``, else any process's, else a bind mount in
``/run/netns``), opens it, checks the cookie (never reused, unlike inodes and pids: a recycled pid
in another namespace is never touched) and removes the rules inside.

``parse_record`` is total: any bytes give a list (lines that are not three decimal numbers
are skipped). A namespace that went away meanwhile took its rules with it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

RECORD = "/run/egress-monitor/netns-refusing"
MAX_LINES = 4096  # more namespaces than a daemon gates; a longer file is cut, not trusted


@dataclass(frozen=True, slots=True)
class Recorded:
    """One namespace left refusing: its inode, cookie, and a process last seen in it."""

    inode: int
    cookie: int
    pid: int


def format_record(entries: Iterable[Recorded]) -> str:
    return "".join(f"{e.inode} {e.cookie} {e.pid}\n" for e in entries)


def parse_record(text: str) -> list[Recorded]:
    """The entries of a record's text; never raises."""
    out = []
    for line in text.splitlines()[:MAX_LINES]:
        parts = line.split()
        if len(parts) == 3 and all(p.isascii() and p.isdigit() and len(p) <= 20
                                   for p in parts):
            out.append(Recorded(int(parts[0]), int(parts[1]), int(parts[2])))
    return out


def write_record(entries: list[Recorded], path: str = RECORD) -> None:
    """Write the record (atomically), or remove it when there is nothing to record."""
    if not entries:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(format_record(entries))
    os.replace(tmp, path)


def find_namespace(entry: Recorded, proc_root: str = "/proc",
                   named: str = "/run/netns") -> str | None:
    """A path to the recorded namespace, by inode (the caller checks the cookie): the
    recorded process's ``ns/net``, any process's, or a named namespace's bind mount
    (``ip netns add``: it outlives every process in it)."""
    paths = [f"{proc_root}/{entry.pid}/ns/net"]
    with contextlib.suppress(OSError):
        paths += [f"{proc_root}/{p}/ns/net" for p in os.listdir(proc_root) if p.isdigit()]
    with contextlib.suppress(OSError):
        paths += [os.path.join(named, n) for n in sorted(os.listdir(named))]
    for path in paths:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == entry.inode:
                return path
    return None


def clean_recorded(remove: Callable[[int], list[str]], cookie: Callable[[int], int],
                   path: str = RECORD, proc_root: str = "/proc",
                   named: str = "/run/netns") -> tuple[int, list[str]]:
    """Remove the rules in every recorded namespace still there; returns how many were
    cleaned and the errors met. ``remove(fd)`` removes the rules inside the namespace of
    ``fd``; ``cookie(fd)`` gives its cookie. The record is removed when nothing failed."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            entries = parse_record(f.read(1 << 20))
    except FileNotFoundError:
        return 0, []
    cleaned, errors = 0, []
    for entry in entries:
        found = find_namespace(entry, proc_root, named)
        if found is None:
            continue  # the namespace is gone, and its rules with it
        try:
            fd = os.open(found, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # its last process ended just now
        try:
            if os.fstat(fd).st_ino != entry.inode or cookie(fd) != entry.cookie:
                continue  # another namespace with a reused inode
            problems = remove(fd)
            errors += problems
            cleaned += not problems
        finally:
            os.close(fd)
    if not errors:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return cleaned, errors
