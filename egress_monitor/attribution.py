"""Turn a flow, its owning process and its build into the JSON event records (pure).

The record shapes here are the contract documented field by field in docs/events.md; the
golden test in tests/unit/test_attribution.py pins them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from egress_monitor import redact
from egress_monitor.builds import Build
from egress_monitor.events import FlowKey
from egress_monitor.process_tree import Node, ProcessTree
from egress_monitor.roles import Crate, Role

SCHEMA_VERSION = 1


def rfc3339(wall: float) -> str:
    """UTC time with microseconds and a ``Z``."""
    return datetime.fromtimestamp(wall, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _crate(crate: Crate | None) -> dict[str, Any] | None:
    return None if crate is None else {"name": crate.name, "version": crate.version}


def build_ref(build: Build) -> dict[str, Any]:
    """The ``build`` object carried by every event about a build."""
    return {"id": build.id, "root_pid": build.root.pid, "root_exe": build.root_exe,
            "cwd": build.cwd}


def role_of(owner: Node | None) -> Role:
    """The role a flow is attributed to: the owner's, or ``other`` when it was not found."""
    return (owner.role or Role.OTHER) if owner is not None else Role.OTHER


def actor(owner: Node | None, build: Build) -> dict[str, Any]:
    """Who did it: the ``process``, ``lineage``, ``role``, ``crate``, ``attribution`` and
    ``build`` fields shared by connection, dns and alert records.

    ``argv`` has secret-looking values masked (:func:`egress_monitor.redact.argv`).
    With no owner (the process exited before it could be found), ``process`` is null,
    ``lineage`` is empty, ``role`` is ``other`` and ``attribution`` says ``build``: the act
    is still recorded against its build, never dropped.
    """
    process = lineage = None
    if owner is not None:
        info = owner.info
        process = {"pid": owner.pid, "exe": owner.exe,
                   "argv": redact.argv(info.argv) if info else [],
                   "uid": info.uid if info else None}
        lineage = [{"pid": n.pid, "exe": n.exe} for n in ProcessTree.lineage(owner)]
    return {
        "process": process,
        "lineage": lineage or [],
        "role": str(role_of(owner)),
        "crate": _crate(owner.crate if owner else None),
        "attribution": "process" if owner is not None else "build",
        "build": build_ref(build),
    }


def connection_event(*, wall: float, flow: FlowKey, owner: Node | None, build: Build,
                     decision: str, mode: str, names: tuple[str, ...] = (),
                     reason: str | None = None) -> dict[str, Any]:
    """A ``type: "connection"`` record; ``reason`` says why a flow was refused."""
    record = {
        "ts": rfc3339(wall),
        "type": "connection",
        "schema": SCHEMA_VERSION,
        "decision": decision,
        "mode": mode,
        "protocol": str(flow.protocol),
        "family": f"ipv{flow.family}",
        "src": {"ip": flow.src, "port": flow.src_port},
        "dst": {"ip": flow.dst, "port": flow.dst_port, "names": list(names)},
        **actor(owner, build),
    }
    if reason is not None:
        record["reason"] = reason
    return record


def build_start_event(*, wall: float, build: Build) -> dict[str, Any]:
    """A ``type: "build_start"`` record."""
    info = build.root.info
    return {"ts": rfc3339(wall), "type": "build_start", "schema": SCHEMA_VERSION,
            "via": build.via, "argv": redact.argv(info.argv) if info else [],
            "cgroup": build.cgroup, "build": build_ref(build)}


def build_end_event(*, wall: float, build: Build, now_ns: int) -> dict[str, Any]:
    """A ``type: "build_end"`` record with the build's summary."""
    return {"ts": rfc3339(wall), "type": "build_end", "schema": SCHEMA_VERSION,
            "summary": build.summary(now_ns), "build": build_ref(build)}


def daemon_event(*, wall: float, state: str, mode: str, **extra: Any) -> dict[str, Any]:
    """A ``type: "daemon"`` record (start, stop, resync)."""
    return {"ts": rfc3339(wall), "type": "daemon", "schema": SCHEMA_VERSION,
            "state": state, "mode": mode, **extra}
