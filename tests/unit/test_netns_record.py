"""The record of namespaces left refusing, and cleanup's use of it (no kernel: a fake /proc
whose ns/net files are plain files, told apart by inode)."""

from __future__ import annotations

import os
from pathlib import Path

from egress_monitor.netns_record import (
    Recorded,
    clean_recorded,
    format_record,
    parse_record,
    write_record,
)


def test_format_and_parse_round_trip_and_junk_is_skipped() -> None:
    entries = [Recorded(4026532000, 7, 123), Recorded(4026532001, 8, 9)]
    assert parse_record(format_record(entries)) == entries
    assert parse_record("1 2\nx y z\n1 2 3 4\n-1 2 3\n\u0661 2 3\n5 6 7\n") == [
        Recorded(5, 6, 7)]


def _proc(tmp: Path, pid: int) -> int:
    ns = tmp / "proc" / str(pid) / "ns"
    ns.mkdir(parents=True)
    (ns / "net").write_text("")
    return os.stat(ns / "net").st_ino


def test_cleanup_removes_rules_in_namespaces_still_there_checking_the_cookie(
        tmp_path: Path) -> None:
    there = _proc(tmp_path, 40)  # the recorded pid ended: another process holds it
    mine = _proc(tmp_path, 50)
    record = str(tmp_path / "run" / "rec")
    write_record([Recorded(there, 11, 30), Recorded(mine, 12, 50), Recorded(1, 13, 60)],
                 record)
    cookies = {there: 11, mine: 99}  # pid 50's namespace: a reused inode, not ours
    removed: list[int] = []

    def remove(fd: int) -> list[str]:
        removed.append(os.fstat(fd).st_ino)
        return []

    (tmp_path / "netns").mkdir()
    (tmp_path / "netns" / "named").write_text("")  # `ip netns add`: no process in it
    named = os.stat(tmp_path / "netns" / "named").st_ino
    write_record([Recorded(there, 11, 30), Recorded(mine, 12, 50), Recorded(1, 13, 60),
                  Recorded(named, 14, 70)], record)
    cookies = {there: 11, mine: 99, named: 14}
    got = clean_recorded(remove, lambda fd: cookies[os.fstat(fd).st_ino], record,
                         str(tmp_path / "proc"), str(tmp_path / "netns"))
    assert got == (2, []) and removed == [there, named]
    assert not os.path.exists(record)  # done: nothing left to find
    assert clean_recorded(remove, lambda fd: 0, record) == (0, [])


def test_a_failed_removal_keeps_the_record(tmp_path: Path) -> None:
    ino = _proc(tmp_path, 7)
    record = str(tmp_path / "rec")
    write_record([Recorded(ino, 1, 7)], record)
    assert clean_recorded(lambda fd: ["iptables: busy"], lambda fd: 1, record,
                          str(tmp_path / "proc"), str(tmp_path / "none")) == (0, [
                              "iptables: busy"])
    assert os.path.exists(record)
    write_record([], record)
    assert not os.path.exists(record)
