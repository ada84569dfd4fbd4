"""fanotify permission events for opens of marked files: the kernel asks before each open.

One group (``FAN_CLASS_CONTENT``), ``FAN_OPEN_PERM`` marks on credential files and on the
directories holding them (``FAN_EVENT_ON_CHILD``). Each event names the opener's pid and
carries an fd of the file being opened, which is used only to name it
(``/proc/self/fd/N``) and is closed when the answer is written: the content is never read.
The opener waits in ``open(2)`` until :meth:`Fanotify.respond` answers, so every event read
must be answered; :meth:`Fanotify.close` lets the kernel allow whatever is still pending.

:func:`decode_events` is the pure, total decoder of the kernel's event records.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from dataclasses import dataclass

FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_CONTENT = 0x04
FAN_MARK_ADD = 0x01
FAN_MARK_REMOVE = 0x02
FAN_OPEN_PERM = 0x00010000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ALLOW = 0x01
FAN_DENY = 0x02
AT_FDCWD = -100
_METADATA = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
FANOTIFY_METADATA_VERSION = 3


@dataclass(frozen=True, slots=True)
class OpenEvent:
    """A process asks to open a marked file; ``fd`` must be answered with ``respond``."""

    pid: int
    fd: int
    mask: int


def decode_events(buf: bytes) -> list[OpenEvent]:
    """The events in one read; a truncated or malformed record ends the list."""
    out: list[OpenEvent] = []
    offset = 0
    while offset + _METADATA.size <= len(buf):
        length, version, _r, meta_len, mask, fd, pid = _METADATA.unpack_from(buf, offset)
        if version != FANOTIFY_METADATA_VERSION or length < _METADATA.size \
                or meta_len < _METADATA.size or offset + length > len(buf):
            break
        out.append(OpenEvent(pid=pid, fd=fd, mask=mask))
        offset += length
    return out


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Fanotify:
    """The group's fd, its marks and its answers."""

    def __init__(self) -> None:
        self._libc = _libc()
        self._libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                                             ctypes.c_int, ctypes.c_char_p]
        fd = self._libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK,
                                      os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fanotify_init: {os.strerror(err)}")
        self.fd: int = fd

    def fileno(self) -> int:
        """For the selector."""
        return self.fd

    def _mark(self, flags: int, path: str, directory: bool) -> None:
        mask = FAN_OPEN_PERM | (FAN_EVENT_ON_CHILD if directory else 0)
        if self._libc.fanotify_mark(self.fd, flags, mask, AT_FDCWD, path.encode()) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fanotify_mark {path}: {os.strerror(err)}")

    def mark(self, path: str, directory: bool) -> None:
        """Ask before opens of ``path`` (a file, or the files directly in a directory)."""
        self._mark(FAN_MARK_ADD, path, directory)

    def unmark(self, path: str, directory: bool) -> None:
        """Stop asking for ``path``."""
        self._mark(FAN_MARK_REMOVE, path, directory)

    def read(self) -> list[OpenEvent]:
        """The pending events (none when there are none)."""
        try:
            buf = os.read(self.fd, 64 * _METADATA.size)
        except BlockingIOError:
            return []
        return decode_events(buf)

    @staticmethod
    def path_of(event: OpenEvent) -> str | None:
        """The file being opened, by its fd; None when it cannot be named."""
        try:
            return os.readlink(f"/proc/self/fd/{event.fd}")
        except OSError:
            return None

    def respond(self, event: OpenEvent, allow: bool) -> None:
        """Answer the kernel, then close the event's fd."""
        try:
            os.write(self.fd, struct.pack("=iI", event.fd, FAN_ALLOW if allow else FAN_DENY))
        finally:
            if event.fd >= 0:
                os.close(event.fd)

    def close(self) -> None:
        """Close the group: the kernel allows every open still waiting for an answer."""
        os.close(self.fd)
