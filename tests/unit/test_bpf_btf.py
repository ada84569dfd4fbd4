"""The BTF reader on a hand-built blob, on the running kernel's BTF, and on hostile bytes."""

from __future__ import annotations

import random
import struct

import pytest

from egress_monitor.bpf import btf
from egress_monitor.bpf.btf import BtfError, parse


def _blob() -> bytes:
    """int; struct s { int a; union { int pad; int b; } /* anon, at byte 8 */; };
    typedef void (*btf_trace_tp)(void *, int, int)."""
    names = b"\0int\0s\0a\0b\0pad\0btf_trace_tp\0"
    off = {n: names.index(n.encode() + b"\0") for n in ("int", "s", "a", "b", "pad",
                                                           "btf_trace_tp")}
    t = b""
    t += struct.pack("<III", off["int"], btf.INT << 24, 4) + struct.pack("<I", 32)  # id 1
    t += struct.pack("<III", off["s"], btf.STRUCT << 24 | 2, 12)  # id 2
    t += struct.pack("<III", off["a"], 1, 0) + struct.pack("<III", 0, 3, 64)
    t += struct.pack("<III", 0, btf.UNION << 24 | 2, 4)  # id 3
    t += struct.pack("<III", off["pad"], 1, 0) + struct.pack("<III", off["b"], 1, 0)
    t += struct.pack("<III", off["btf_trace_tp"], btf.TYPEDEF << 24, 5)  # id 4
    t += struct.pack("<III", 0, btf.PTR << 24, 6)  # id 5
    t += struct.pack("<III", 0, btf.FUNC_PROTO << 24 | 3, 0)  # id 6
    t += struct.pack("<II", 0, 0) + struct.pack("<II", 0, 1) + struct.pack("<II", 0, 1)
    header = struct.pack("<HBBIIIII", btf.MAGIC, 1, 0, 24, 0, len(t), len(t), len(names))
    return header + t + names


def test_member_offsets_look_through_anonymous_members() -> None:
    b = parse(_blob())
    assert b.member_offset("s", "a") == 0
    assert b.member_offset("s", "b") == 8
    assert b.tracepoint_args("tp") == 2
    with pytest.raises(BtfError, match="no member c"):
        b.member_offset("s", "c")
    with pytest.raises(BtfError, match="struct t not in BTF"):
        b.member_offset("t", "a")
    with pytest.raises(BtfError, match="tracepoint nope"):
        b.tracepoint_args("nope")


def test_running_kernel_has_what_the_programs_read() -> None:
    from egress_monitor.bpf.programs import Offsets
    off = Offsets.from_btf(btf.load_vmlinux())
    assert 0 < off.task_tgid < 16384 and off.inode_ino != off.inode_sb


@pytest.mark.parametrize("blob, message", [
    (b"", "shorter"),
    (b"\0" * 24, "magic"),
    (_blob()[:40], "past the end"),
])
def test_malformed_blobs_raise_btf_error(blob: bytes, message: str) -> None:
    with pytest.raises(BtfError, match=message):
        parse(blob)


def test_any_bytes_give_btf_or_btf_error() -> None:
    rng = random.Random(10)
    good = _blob()
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[:rng.randint(0, len(data))] if rng.random() < 0.3 else data
        try:
            b = parse(bytes(data))
        except BtfError:
            continue
        for name in ("a", "b"):  # lookups on a parsed blob are total too
            try:
                b.member_offset("s", name)
                b.tracepoint_args("tp")
            except BtfError:
                pass
