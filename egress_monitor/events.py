"""Typed, frozen events that cross from the kernel-facing sources into the sans-IO core.

Nothing past ``egress_monitor.sources`` sees a raw netlink message or packet: sources turn
them into these records at once. Every timestamp here is CLOCK_MONOTONIC nanoseconds, the
clock the proc connector stamps its events with.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProcFork:
    """A new process (not a thread): ``child`` was forked by ``parent`` at ``ts_ns``.

    ``parent`` is the thread group that really forked, which is what lineage keeps even
    after the child is reparented to init or a subreaper.
    """

    parent: int
    child: int
    ts_ns: int


@dataclass(frozen=True, slots=True)
class ProcExec:
    """Thread group ``pid`` replaced its image with a new program at ``ts_ns``."""

    pid: int
    ts_ns: int


@dataclass(frozen=True, slots=True)
class ProcExit:
    """Thread group ``pid`` exited (its last thread is gone) at ``ts_ns``."""

    pid: int
    ts_ns: int


@dataclass(frozen=True, slots=True)
class ProcEventsLost:
    """The kernel dropped proc events (the socket overflowed: ENOBUFS); the tree must resync."""


@dataclass(frozen=True, slots=True)
class ProcUid:
    """A thread of group ``pid`` changed its real or effective uid (``PROC_EVENT_UID``);
    ``ruid`` and ``euid`` are the new values, as seen from the initial user namespace."""

    pid: int
    ruid: int
    euid: int
    ts_ns: int


@dataclass(frozen=True, slots=True)
class ProcPtrace:
    """Thread group ``tracer`` ptrace-attached (``PTRACE_ATTACH`` or ``PTRACE_SEIZE``) to
    thread group ``target`` (``PROC_EVENT_PTRACE``; detaches are not reported)."""

    tracer: int
    target: int
    ts_ns: int


ProcEvent = ProcFork | ProcExec | ProcExit | ProcEventsLost | ProcUid | ProcPtrace


@dataclass(frozen=True, slots=True)
class ExecInfo:
    """What /proc said about a process right after it exec'd.

    Any field may be missing: the process can be gone before it is read. ``cargo_env`` holds
    only the Cargo variables used for attribution (``CARGO_PKG_NAME``, ``CARGO_PKG_VERSION``,
    ``CARGO_MANIFEST_DIR``); no other variable's value is ever read into the daemon's state.
    """

    exe: str | None
    argv: tuple[str, ...] = ()
    cwd: str | None = None
    uid: int | None = None
    cargo_env: tuple[tuple[str, str], ...] = ()

    def env(self, name: str) -> str | None:
        """The value of one kept Cargo variable, or None."""
        for key, value in self.cargo_env:
            if key == name:
                return value
        return None


class Protocol(enum.StrEnum):
    """Transport protocols the connection gate names in events and metrics."""

    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"
    ICMPV6 = "icmpv6"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class FlowKey:
    """The addresses of a flow's first packet as the sending host sees them.

    For ICMP echo ``src_port`` carries the echo identifier and ``dst_port`` is 0; for other
    protocols without ports both are 0.
    """

    family: int  # 4 or 6
    protocol: Protocol
    proto_number: int
    src: str
    src_port: int
    dst: str
    dst_port: int


@dataclass(frozen=True, slots=True)
class QueuedPacket:
    """The first packet of a new flow from a build, held in the kernel awaiting a verdict."""

    queue: int
    packet_id: int
    payload: bytes
    uid: int | None = None
    received_ns: int = 0
    mark: int | None = None  # NFQA_MARK: a member socket's stamp (bpf/marks.py) names its creator
