"""Container cgroups as they appear (sources/cgroup_watch.py): the parser, and the watch on
a plain directory tree standing in for the cgroup2 mount (inotify works the same there,
but a plain directory has no ``cgroup.events`` written by the kernel)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from egress_monitor.sources.cgroup_watch import (
    IN_CREATE,
    IN_ISDIR,
    Appeared,
    ContainerCgroups,
    Gone,
    Populated,
    RawEvent,
    parse_events,
)

ID = "ab" * 32


def _event(wd: int, mask: int, name: bytes = b"") -> bytes:
    padded = name + b"\0" * (-len(name) % 16) if name else b""
    return struct.pack("=iIII", wd, mask, 0, len(padded)) + padded


def test_parse_events() -> None:
    buf = _event(1, IN_CREATE | IN_ISDIR, b"docker-x.scope") + _event(2, 2)
    assert parse_events(buf) == [RawEvent(1, IN_CREATE | IN_ISDIR, "docker-x.scope"),
                                 RawEvent(2, 2, "")]
    assert parse_events(b"") == []
    assert parse_events(buf[:-1]) is None  # a torn event
    assert parse_events(struct.pack("=iIII", 1, 0, 0, 1000)) is None  # name past the end


def test_container_cgroups_appear_in_watched_parents(tmp_path: Path) -> None:
    (tmp_path / "system.slice").mkdir()
    watch = ContainerCgroups(str(tmp_path), ("system.slice", "ci.slice"))
    try:
        (tmp_path / "system.slice" / f"docker-{ID}.scope").mkdir()
        (tmp_path / "system.slice" / "cron.service").mkdir()  # no container
        got = watch.read(7)
        assert got == [Appeared(f"/system.slice/docker-{ID}.scope", 7)]
        # A parent made later is watched from the next refresh; nested parents too.
        (tmp_path / "ci.slice").mkdir()
        watch.refresh()
        (tmp_path / "ci.slice" / "docker").mkdir()
        assert watch.read(8) == []
        (tmp_path / "ci.slice" / "docker" / ID).mkdir()
        assert watch.read(9) == [Appeared(f"/ci.slice/docker/{ID}", 9)]
        # A tied container's cgroup.events, and its removal.
        scope = tmp_path / "system.slice" / f"docker-{ID}.scope"
        (scope / "cgroup.events").write_text("populated 0\n")
        watch.watch_container(f"/system.slice/docker-{ID}.scope")
        (scope / "cgroup.events").write_text("populated 1\n")
        assert Populated(f"/system.slice/docker-{ID}.scope") in watch.read(10)
        os.unlink(scope / "cgroup.events")
        scope.rmdir()
        assert Gone(f"/system.slice/docker-{ID}.scope") in watch.read(11)
    finally:
        watch.close()
