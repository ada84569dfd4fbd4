"""Container cgroups as they appear: inotify on the cgroup2 tree's container parents.

Engines create a container's cgroup (``system.slice/docker-<id>.scope``,
``machine.slice/libpod-<id>.scope``, ``docker/<id>``, ``kubepods.../cri-containerd-<id>.scope``)
with ``mkdir`` *before* they move its first process in, so an ``IN_CREATE`` on the parent
comes before anything runs there. The container's ``cgroup.events`` is then watched too: the
kernel writes it (``IN_MODIFY``) when ``populated`` changes, i.e. when the first process
arrives. Why inotify rather than the proc connector: a fork event of a process in a container
would come after it runs, and knowing its cgroup means reading ``/proc/PID/cgroup`` for every
fork on the host; inotify costs nothing for the host's other processes.

Parents are watched non-recursively; a new directory below a parent that names no container
(a Kubernetes QoS or pod slice, ``docker/`` appearing later) is watched in turn, to
:data:`MAX_DEPTH`. Parents that do not exist yet are retried at each :meth:`refresh`.
:func:`parse_events` is pure and total (fuzzed).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import struct
from dataclasses import dataclass

from egress_monitor.containers import container_of

log = logging.getLogger(__name__)
IN_MODIFY, IN_CREATE, IN_DELETE = 0x2, 0x100, 0x200
IN_DELETE_SELF, IN_IGNORED, IN_ISDIR, IN_Q_OVERFLOW = 0x400, 0x8000, 0x40000000, 0x4000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
_HEAD = struct.Struct("=iIII")  # wd, mask, cookie, len
MAX_DEPTH = 4
DEFAULT_PARENTS = ("system.slice", "machine.slice", "docker", "libpod_parent", "kubepods",
                   "kubepods.slice")
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class RawEvent:
    wd: int
    mask: int
    name: str  # empty for events on the watched object itself


@dataclass(frozen=True, slots=True)
class Appeared:
    """A container's cgroup was created (``rel``: relative to the mount, starting '/')."""

    rel: str
    ts_ns: int


@dataclass(frozen=True, slots=True)
class Populated:
    """A watched container cgroup's ``cgroup.events`` changed (a process arrived or left)."""

    rel: str


@dataclass(frozen=True, slots=True)
class Gone:
    rel: str


Change = Appeared | Populated | Gone


def parse_events(buf: bytes) -> list[RawEvent] | None:
    """The events in one ``read()`` of an inotify descriptor; None when the bytes are not
    a whole number of well-formed events. Never raises."""
    out = []
    off = 0
    while off < len(buf):
        if len(buf) - off < _HEAD.size:
            return None
        wd, mask, _cookie, length = _HEAD.unpack_from(buf, off)
        off += _HEAD.size
        if length > len(buf) - off:
            return None
        raw = buf[off:off + length].split(b"\0", 1)[0]
        off += length
        out.append(RawEvent(wd, mask, raw.decode("utf-8", "surrogateescape")))
    return out


class ContainerCgroups:
    """The inotify descriptor and what each watch is."""

    def __init__(self, mount: str, parents: tuple[str, ...] = DEFAULT_PARENTS) -> None:
        self.mount = mount.rstrip("/")
        self.parents = tuple("/" + p.strip("/") for p in parents if p.strip("/"))
        self.fd: int = int(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        if self.fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        self._dirs: dict[int, str] = {}  # wd -> rel of a watched parent directory
        self._events: dict[int, str] = {}  # wd -> rel of a container (its cgroup.events)
        self._watched: set[str] = set()
        self.refresh()

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def _add(self, path: str, mask: int) -> int | None:
        wd = _libc.inotify_add_watch(self.fd, path.encode("utf-8", "surrogateescape"), mask)
        if wd < 0:
            code = ctypes.get_errno()
            if code not in (errno.ENOENT, errno.ENOTDIR):
                log.warning("cannot watch %s: %s", path, os.strerror(code))
            return None
        return int(wd)

    def _watch_dir(self, rel: str, depth: int) -> None:
        if rel in self._watched or depth > MAX_DEPTH:
            return
        wd = self._add(self.mount + rel, IN_CREATE | IN_DELETE | IN_ONLYDIR)
        if wd is None:
            return
        self._dirs[wd] = rel
        self._watched.add(rel)
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.mount + rel):
                child = f"{rel}/{entry.name}"
                if entry.is_dir(follow_symlinks=False) and container_of(child) is None:
                    self._watch_dir(child, depth + 1)

    def refresh(self) -> None:
        """Watch the parents that exist now (engines start late, slices come and go)."""
        for rel in self.parents:
            self._watch_dir(rel, 1)

    def watch_container(self, rel: str) -> None:
        """Report ``cgroup.events`` changes of this container's cgroup from now on."""
        wd = self._add(f"{self.mount}{rel}/cgroup.events", IN_MODIFY)
        if wd is not None:
            self._events[wd] = rel

    def forget(self, rel: str) -> None:
        for wd, known in list(self._events.items()):
            if known == rel:
                del self._events[wd]
                _libc.inotify_rm_watch(self.fd, wd)

    def read(self, now_ns: int) -> list[Change]:
        """What changed since the last read (non-blocking)."""
        out: list[Change] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            events = parse_events(buf)
            if events is None:
                log.error("malformed inotify read (%d bytes)", len(buf))
                return out
            for ev in events:
                out += self._handle(ev, now_ns)

    def _handle(self, ev: RawEvent, now_ns: int) -> list[Change]:
        if ev.mask & IN_Q_OVERFLOW:
            log.warning("inotify queue overflowed: container cgroups may have been missed")
            return []
        if ev.wd in self._events:
            rel = self._events[ev.wd]
            if ev.mask & IN_IGNORED:
                del self._events[ev.wd]
                return [Gone(rel)]
            return [Populated(rel)]
        parent = self._dirs.get(ev.wd)
        if parent is None:
            return []
        if ev.mask & IN_IGNORED:
            del self._dirs[ev.wd]
            self._watched.discard(parent)
            return []
        if not ev.mask & IN_ISDIR or not ev.name:
            return []
        rel = f"{parent}/{ev.name}"
        found = container_of(rel)
        if ev.mask & IN_DELETE:
            self._watched.discard(rel)
            return [Gone(rel)] if found is not None and found != container_of(parent) else []
        if found is not None and found != container_of(parent):
            return [Appeared(rel, now_ns)]
        if found is None:
            self._watch_dir(rel, parent.count("/") + 1)
        return []
