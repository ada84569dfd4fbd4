"""Exec records: the bytes ``em_exec`` writes, decoded (the kernel side is in
tests/kernel/test_bpf_exec.py)."""

from __future__ import annotations

import pytest

from egress_monitor.bpf import programs
from egress_monitor.bpf.execs import ExecRecord, parse_exec_record
from egress_monitor.bpf.programs import (
    EXEC_RECORD,
    EXEC_STARTED,
    FILENAME_MAX,
    ROLE_CARGO,
    ROLE_CRATE,
    ROLE_NONE,
    member_value,
)


def raw(value: int, role_before: int = ROLE_NONE, flags: int = 0,
        name: bytes = b"/usr/bin/cargo") -> bytes:
    return EXEC_RECORD.pack(123456789, value, role_before, flags, 0x800001, 4242, name)


def test_layout_is_what_the_program_writes() -> None:
    """The offsets exec_program stores at are where the userspace format reads each field."""
    assert EXEC_RECORD.size == 288 and FILENAME_MAX == 256
    rec = EXEC_RECORD.pack(0x1111111111111111, 0x2222222222222222, 0x33, 0x44, 0x55555555,
                           0x6666666666666666, b"\x77" * 256)
    for off, size, byte in ((programs._REC_KTIME, 8, 0x11), (programs._REC_VALUE, 8, 0x22),
                            (programs._REC_ROLE, 1, 0x33), (programs._REC_FLAGS, 1, 0x44),
                            (programs._REC_DEV, 4, 0x55), (programs._REC_INODE, 8, 0x66),
                            (programs._REC_NAME, 256, 0x77)):
        assert rec[off:off + size] == bytes([byte]) * size
    assert rec[programs._REC_FLAGS + 1:programs._REC_DEV] == b"\0\0"  # the pad it zeroes


def test_a_build_start() -> None:
    rec = parse_exec_record(99, raw(member_value(99, ROLE_CARGO, pending=True),
                                    flags=EXEC_STARTED))
    assert rec == ExecRecord(tgid=99, ktime_ns=123456789,
                             value=member_value(99, ROLE_CARGO, pending=True),
                             role_before=ROLE_NONE, role_after=ROLE_CARGO, started=True,
                             pending=True, build=99, dev=0x800001, inode=4242,
                             filename="/usr/bin/cargo")


def test_a_member_exec_of_a_named_build() -> None:
    rec = parse_exec_record(7, raw(member_value(31, ROLE_CRATE), ROLE_CARGO,
                                   name=b"target/debug/build/x-1/build-script-build"))
    assert rec is not None
    assert (rec.role_before, rec.role_after, rec.started, rec.pending, rec.build) == (
        ROLE_CARGO, ROLE_CRATE, False, False, 31)
    assert rec.filename == "target/debug/build/x-1/build-script-build"


@pytest.mark.parametrize("name, text", [
    (b"", ""),
    (b"/a\0stale tail of an older name", "/a"),       # only up to the first NUL
    (b"/bin/\xff\xfe", "/bin/\udcff\udcfe"),           # not UTF-8: bytes kept
    (b"x" * 256, "x" * 256),                          # no NUL at all: all of it
])
def test_filename_decoding_is_total(name: bytes, text: str) -> None:
    rec = parse_exec_record(1, raw(0, name=name))
    assert rec is not None and rec.filename == text
    assert rec.filename.encode("utf-8", "surrogateescape") == name.split(b"\0")[0]


@pytest.mark.parametrize("size", [0, 1, 287, 289, 1024])
def test_anything_but_one_record_is_none(size: int) -> None:
    assert parse_exec_record(1, bytes(size)) is None
