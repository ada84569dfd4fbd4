"""Where a record's process ran: the ``netns`` and ``container`` fields (pure).

Connection records get them as they are judged (``daemon._where``: the gate the packet came
through). DNS records and alerts (the sinkhole's ``blocked_attempt`` among them) get them
from their process when they are written: its network namespace by ``/proc/PID/ns/net``
(one ``stat``; none when it is the daemon's, or the process is gone) and its container by
the cgroup path of its build, or the container an engine started for the build
(``engine_launch.py``, with ``launched_by``). The same shapes as connection records.
"""

from __future__ import annotations

from typing import Any

from egress_monitor.containers import Container


def where_fields(inode: int | None, own_inode: int | None, container: Container | None,
                 launched_by: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields to add: ``netns`` (an inode other than ``own_inode``), ``container``,
    ``launched_by``; only those known."""
    out: dict[str, Any] = {}
    if inode is not None and own_inode is not None and inode != own_inode:
        out["netns"] = inode
    if container is not None:
        out["container"] = {"runtime": container.runtime, "id": container.id,
                            "pod": container.pod}
    if launched_by is not None:
        out["launched_by"] = launched_by
    return out
